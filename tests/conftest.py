"""Shared fixtures. Helpers for building tiny models and tokenizers live in tests/helpers.py (on pytest's
pythonpath)."""

import pytest
from helpers import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on a few sentences, with BOS/EOS/PAD, offsets and a chat template; its files
    are in `tiny_tokenizer.name_or_path` (copy them next to a model)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def pytest_terminal_summary(terminalreporter):
    """The robustness figures (tests/robustness/robustness_report.py), when those tests ran."""
    import sys

    report = sys.modules.get("robustness_report")
    if report is None or not getattr(report, "FIGURES", None):
        return
    terminalreporter.section("robustness figures")
    for line in report.summary_lines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written to {report.write()}")
