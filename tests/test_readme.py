"""The README's Quickstart has exactly two commands, and CI runs both."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the Quickstart has a bash block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_quickstart_has_two_commands_and_ci_runs_them():
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert commands[1].endswith("python -m pytest"), "the second command runs the test suite"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_lines = [ln.strip() for ln in ci.splitlines()]
    for cmd in commands:
        assert cmd in ci_lines, f".ci/run does not run the README command: {cmd}"


def _usage_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_usage_has_a_cpu_snippet_and_a_cuda_one():
    blocks = _usage_blocks()
    assert len(blocks) == 2
    assert "cuda" not in blocks[0], "the first Usage snippet runs without a GPU"
    assert 'device="cuda"' in blocks[1]


_CHECKS = """
import json
from maxfusion_kernels import choose_backend
_, masked = max_fuse([depth, edges], masks=[left, 1 - left], return_info=True)
print("CHECK", json.dumps({
    "backend": choose_backend(depth.device),
    "fused": fused.shape == depth.shape,
    "streams": len(streams),
    "tokens": fused_tokens.shape == tokens[0].shape,
    "share_1": (info.winner == 1).float().mean().item(),
    "left_is_depth": bool((masked.winner[..., :32] == 0).all()),
    "right_is_edges": bool((masked.winner[..., 32:] == 1).all()),
}))
"""


def test_the_cpu_usage_snippet_runs_as_written():
    # in a fresh interpreter without the suite's TRITON_INTERPRET=1, as a user would run it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", _usage_blocks()[0] + _CHECKS], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    checks = json.loads(lines[-1].removeprefix("CHECK "))
    assert checks["backend"] == "torch"
    assert checks["fused"] and checks["tokens"] and checks["streams"] == 2
    # the printed number is the share of sites won by the second input (index 1)
    printed = float(lines[0].removeprefix("tensor(").rstrip(")"))
    assert abs(printed - checks["share_1"]) < 1e-4
    assert 0.3 < printed < 0.7
    # the masks give each input its half: depth (0) wins the left half, edges (1) the right
    assert checks["left_is_depth"] and checks["right_is_edges"]
