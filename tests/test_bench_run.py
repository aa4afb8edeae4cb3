"""benchmarks/run.py --quick leaves nothing in the checkout: without --out its records go to the
system's temp folder, never into benchmarks/results/ (which holds committed data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_quick_run_writes_its_records_to_the_temp_folder(tmp_path: Path):
    results = ROOT / "benchmarks" / "results"
    before = set(results.iterdir())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--device", "cpu",
         "--no-compile", "--cases", "sd3_tokens_1024", "--n-inputs", "2", "--reps", "1",
         "--warmup", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    written = list(tmp.glob("maxfusion-bench-*-quick.json"))
    assert len(written) == 1, (run.stdout[-2000:], list(tmp.iterdir()))
    assert run.stdout.strip().splitlines()[-1] == (
        f"wrote {len(json.loads(written[0].read_text()))} records to {written[0]}")
    assert set(results.iterdir()) == before, "a quick run wrote into benchmarks/results/"
    assert [p.name for p in tmp_path.iterdir()] == ["tmp"], "and nothing into the current folder"
