"""resolve_adapter_dir: local directories, the hub (faked), HF_HUB_OFFLINE and the errors users see."""

from __future__ import annotations

import huggingface_hub
import pytest
from adapter_files import write_reference_adapter

from gorgon.adapters.source import resolve_adapter_dir


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


class FakeHub:
    """Stands in for snapshot_download: 'downloads' from a prepared directory, recording each call."""

    def __init__(self, repo_dir):
        self.repo_dir = repo_dir
        self.calls = []

    def __call__(self, repo_id, **kw):
        self.calls.append((repo_id, kw))
        return str(self.repo_dir)


def test_local(tmp_path):
    write_reference_adapter(tmp_path / "a")
    assert resolve_adapter_dir(str(tmp_path / "a"), "local") == tmp_path / "a"
    with pytest.raises(ValueError, match="source local\\): no such directory"):
        resolve_adapter_dir(str(tmp_path / "nope"), "local")
    with pytest.raises(ValueError, match="a file, not a directory"):
        resolve_adapter_dir(str(tmp_path / "a" / "config.json"), "local")
    with pytest.raises(ValueError, match="Unknown adapter source 's3'"):
        resolve_adapter_dir(str(tmp_path / "a"), "s3")
    assert resolve_adapter_dir(str(tmp_path / "a"), None) == tmp_path / "a"


def test_hub_accepts_a_local_directory(tmp_path):
    write_reference_adapter(tmp_path / "a")
    assert resolve_adapter_dir(str(tmp_path / "a"), "hub") == tmp_path / "a"


def test_hub_download(tmp_path, monkeypatch):
    write_reference_adapter(tmp_path / "repo")
    fake = FakeHub(tmp_path / "repo")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_adapter_dir("org/medusa", "hub", api_token="hf_secret", revision="v1") == tmp_path / "repo"
    [(repo_id, kw)] = fake.calls  # safetensors present: no second call for legacy pickles
    assert repo_id == "org/medusa" and kw["token"] == "hf_secret" and kw["revision"] == "v1"
    assert kw["local_files_only"] is False and "*.safetensors" in kw["allow_patterns"]


def test_hub_legacy_pickles_and_non_adapters(tmp_path, monkeypatch):
    write_reference_adapter(tmp_path / "repo", weights="medusa_lm_head.pt")
    fake = FakeHub(tmp_path / "repo")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve_adapter_dir("org/old-medusa")
    assert len(fake.calls) == 2 and "medusa_lm_head.pt" in fake.calls[1][1]["allow_patterns"]
    assert all(kw["local_files_only"] for _, kw in fake.calls)  # HF_HUB_OFFLINE read at call time

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tmp_path / "model"))
    with pytest.raises(ValueError, match="is not an adapter"):
        resolve_adapter_dir("org/a-model")


def test_hub_offline_and_not_cached(offline_empty_cache):
    with pytest.raises(ValueError, match="not in the local HF cache and HF_HUB_OFFLINE is set"):
        resolve_adapter_dir("org/medusa-heads", "hub")


def test_invalid_hub_id(offline_empty_cache):
    with pytest.raises(ValueError, match="not a local directory, nor a valid hub id"):
        resolve_adapter_dir("not a valid//id", "hub")
