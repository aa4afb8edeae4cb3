"""The README's Quickstart has exactly two commands, and CI runs both."""

from __future__ import annotations

import re
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
