"""scripts/general-recipe.sh runs its stages in order with arguments the real parsers accept: each `gorgon`
call goes to a stand-in that parses it with Gorgon's own parsers (and writes an empty distill record file),
compose and prepare run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_GORGON = """#!{python}
import sys
from pathlib import Path

argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(argv) + "\\n")
if argv[0] == "train":
    from gorgon.train import parse_train_args

    parse_train_args(argv[1:])
else:
    from gorgon.cli import build_parser

    args = build_parser().parse_args(argv)
    if argv[0] == "distill":
        Path(args.output_filename + ".done.jsonl").write_text("")
"""


def test_recipe_script_stages_and_arguments(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    fake = bin_dir / "gorgon"
    fake.write_text(FAKE_GORGON.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    # The stand-in first, then this interpreter's own bin directory (its `python` has Gorgon installed).
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = dict(os.environ, PATH=path)
    run, out = tmp_path / "run", tmp_path / "adapter"
    proc = subprocess.run(
        ["bash", "scripts/general-recipe.sh", str(run), str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + (run / "compose.log").read_text()
    calls = [line.split()[0] for line in log.read_text().splitlines()]
    assert calls == ["distill", "train", "tune-tree"]
    stages = [line.rsplit(" ", 2)[0] for line in (run / "times").read_text().splitlines()[1:-1]]
    assert stages == ["compose", "distill greedy", "prepare", "train", "tune-tree"]
    assert (run / "times").read_text().splitlines()[-1].startswith("total ")
    prompts = [c[0]["content"] for c in json.loads((run / "prompts.json").read_text())]
    assert len(prompts) == 5000 and len(set(prompts)) > 4975  # both families, hardly any overlap
