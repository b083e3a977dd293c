"""`--adapter-root`: adapters named by requests with adapter_source=local must lie inside the operator's
directories; symlinks, `..` and absolute paths cannot escape, and a hub id never reads a local directory."""

from __future__ import annotations

import os

import pytest

from gorgon.adapters.source import resolve_adapter_dir


@pytest.fixture
def layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, outside = tmp_path / "adapters", tmp_path / "secret"
    (root / "good").mkdir(parents=True)
    (root / "nested" / "deep").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "inner_link").symlink_to(root / "good")
    return root, outside


def test_inside_the_root(layout):
    root, _ = layout
    roots = (root,)
    assert resolve_adapter_dir("good", "local", allowed_roots=roots) == (root / "good").resolve()
    assert resolve_adapter_dir(str(root / "good"), "local", allowed_roots=roots) == (root / "good").resolve()
    assert (
        resolve_adapter_dir("nested/deep/../../good", "local", allowed_roots=roots)
        == (root / "good").resolve()
    )
    assert resolve_adapter_dir("inner_link", "local", allowed_roots=roots) == (root / "good").resolve()


@pytest.mark.parametrize(
    "adapter_id",
    ["link", "../secret", "good/../../secret", "nested/../../secret"],
)
def test_relative_escapes_are_refused(layout, adapter_id):
    root, _ = layout
    with pytest.raises(ValueError, match="outside the directories this server allows"):
        resolve_adapter_dir(adapter_id, "local", allowed_roots=(root,))


def test_absolute_escapes_are_refused(layout):
    root, outside = layout
    for adapter_id in (str(outside), str(root / "link"), "/etc", str(root / ".." / "secret")):
        with pytest.raises(ValueError, match="outside"):
            resolve_adapter_dir(adapter_id, "local", allowed_roots=(root,))


def test_missing_inside_the_root(layout):
    root, _ = layout
    with pytest.raises(ValueError, match="no such directory"):
        resolve_adapter_dir("nope", "local", allowed_roots=(root,))


def test_hub_source_never_reads_local_directories_when_confined(layout):
    root, outside = layout
    with pytest.raises(ValueError) as err:
        resolve_adapter_dir(str(outside), "hub", allowed_roots=(root,))
    assert "not a local directory, nor a valid hub id" in str(err.value) or "HF_HUB_OFFLINE" in str(err.value)


def test_without_roots_local_paths_are_read_anywhere(layout):
    _, outside = layout
    assert resolve_adapter_dir(str(outside), "local") == outside


def test_nul_in_id(layout):
    root, _ = layout
    with pytest.raises(ValueError, match="NUL"):
        resolve_adapter_dir("good\x00", "local", allowed_roots=(root,))


def test_several_roots(layout, tmp_path):
    root, _ = layout
    other = tmp_path / "more"
    (other / "x").mkdir(parents=True)
    assert resolve_adapter_dir("x", "local", allowed_roots=(root, other)) == (other / "x").resolve()
    assert os.path.isdir(resolve_adapter_dir("good", "local", allowed_roots=(root, other)))
