"""Figures of the robustness tests, printed at the end of the run and written to
`robustness-results/robustness.json` (`make robustness`; CI runs these tests with the rest)."""

from __future__ import annotations

import json
from pathlib import Path

FIGURES: dict[str, dict] = {}
REPORT = Path("robustness-results") / "robustness.json"


def record(section: str, **figures) -> None:
    """Add figures under `section` (numbers accumulate, other values are replaced)."""
    entry = FIGURES.setdefault(section, {})
    for key, value in figures.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in entry:
            entry[key] += value
        else:
            entry[key] = value


def summary_lines() -> list[str]:
    lines = []
    for section, figures in sorted(FIGURES.items()):
        cells = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        lines.append(f"{section}: {cells}")
    return lines


def write() -> Path:
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(FIGURES, indent=2, sort_keys=True))
    return REPORT
