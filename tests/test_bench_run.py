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


def test_a_quick_run_has_the_backward_rows(tmp_path: Path):
    """The backward rows of a quick CPU run: forward+backward and the backward alone of
    max_fuse and of the reference's autograd, and the forward alone, for merge and unmerge,
    their GB/s counted on the minimum bytes (inputs and output gradients read once, input
    gradients written once)."""
    out = tmp_path / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--device", "cpu",
         "--no-compile", "--cases", "sd3_tokens_1024", "--n-inputs", "2", "--reps", "1",
         "--warmup", "0", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "## backward: N=2, float32" in run.stdout
    recs = [r for r in json.loads(out.read_text()) if r["scope"] == "backward"]
    seen = {(r["method"], r["unmerge"]) for r in recs}
    methods = {"reference_fwd_bwd", "reference_bwd", "max_fuse_fwd", "max_fuse_fwd_bwd",
               "max_fuse_bwd", "copy"}
    assert seen == {(m, u) for m in methods for u in (False, True)}, seen
    for r in recs:
        assert r.get("error") is None, r
        x, n = r["input_bytes"], r["n_inputs"]
        n_out = n if r["unmerge"] else 1
        assert r["backward_bytes"] == (2 * n + n_out) * x
        expected = {"max_fuse_fwd": (n + n_out) * x, "reference_bwd": r["backward_bytes"],
                    "max_fuse_bwd": r["backward_bytes"], "copy": r["backward_bytes"]}.get(
                        r["method"], (n + n_out) * x + r["backward_bytes"])
        assert r["bytes"] == expected, r
        assert r["ms"] > 0 and abs(r["gbps"] - r["bytes"] / (r["ms"] * 1e6)) < 1e-9 * r["gbps"]
