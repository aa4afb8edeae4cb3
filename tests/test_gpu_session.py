"""The GPU session script (``benchmarks/gpu_session.sh``) in its dry run: every step runs to the
end on CPU (Triton interpreter, tiny sizes) and what lands in ``$OUT`` is what the device tool
returns (at most 8 files, plain names); one step failing or hanging leaves the steps before it
kept and the steps after it run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
ALL_STEPS = ["env", "wheels", "precompile", "tests", "sanitizer_memcheck", "sanitizer_racecheck",
             "sanitizer_synccheck", "sanitizer", "speed", "pipeline", "backward", "speed_n3"]


def _dry_run(out: Path, timeout: int = 600, **env_extra) -> tuple[subprocess.CompletedProcess,
                                                                   dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SESSION_")}
    env.update(OUT=str(out), PYTHON=sys.executable, **env_extra)
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=timeout)
    summary = json.loads((out / "summary.json").read_text())
    return res, summary


def _returned_files(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for p in files:
        assert len(p.relative_to(out).parts) <= 3, p
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in p.relative_to(out).parts)
    return files


def _logs(out: Path) -> dict[str, str]:
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode(errors="replace")
                for m in tar.getmembers() if m.isfile()}


def test_dry_run_runs_every_step_and_returns_three_files(tmp_path):
    out = tmp_path / "out"
    res, summary = _dry_run(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = _returned_files(out)
    assert sorted(p.name for p in files) == ["logs.tar.gz", "summary.json", "summary.md"]
    steps = {row["step"]: row for row in summary["steps"]}
    assert list(steps) == ALL_STEPS
    assert all(row["rc"] == "0" for row in steps.values()), steps
    assert summary["dry_run"] is True
    r = summary["results"]
    assert r["env"]["torch"] and r["env"]["packages"]["diffusers"]
    assert r["precompile"]["processes"] == 2 and not r["precompile"]["errors"]
    assert r["precompile"]["variants_compiled_summed"] >= 1
    tests = r["tests"]
    assert tests["pytest_rc"] == 0 and tests["skipped"] > 100 and tests["failed"] == 0
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert r["sanitizer"][tool]["target_done"] is True, r["sanitizer"]
    for key, n in (("speed", 2), ("speed_n3", 3)):
        rows = r[key]["rows"]
        assert rows and all(row["n"] == n for row in rows)
        for row in rows:
            for method in ("maxfusion", "sum", "reference", "copy"):
                assert row["methods"][method]["ms"] > 0, (key, row["case"], method)
            assert row["ratios"]["sum/maxfusion eager"] > 0
    assert {rec["method"] for rec in r["pipeline"]["records"]} == {
        "sum", "residual", "block", "block_reference_ops"}
    for mode in ("merge", "unmerge"):  # the landed backward: a gradient, by the kernels
        b = r["backward"][mode]
        assert b["grad_fn"] != "None" and b["triton_backward_kernels"] is True, b
        assert b["pass"] is True and max(b["rel_error"]) < 2e-2, b
        for name in ("forward_backward", "backward", "reference_forward_backward",
                     "reference_backward", "forward_only"):
            assert b[f"{name}_ms"] > 0, (mode, name, b)
        assert b["backward_gbps"] > 0 and b["forward_backward_gbps"] > 0
    logs = _logs(out)
    if list((ROOT / ".whl").glob("*.whl")):  # fetched here: installed for Python 3.12
        assert "diffusers" in logs["wheels.log"], logs["wheels.log"][-2000:]
    else:  # a fresh clone (CI): the dry run says how to fetch them and goes on
        assert "--fetch-wheels" in logs["wheels.log"]
    for name in ALL_STEPS:
        assert f"{name}.log" in logs, sorted(logs)
    assert "sanitize-target: done" in logs["sanitizer_memcheck.log"]
    md = (out / "summary.md").read_text()
    for name in ALL_STEPS:
        assert f"| {name} | ok |" in md
    assert res.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the summary is last


def test_a_failing_step_leaves_the_others_running(tmp_path):
    out = tmp_path / "out"
    res, summary = _dry_run(out, GPU_SESSION_STEPS="env,backward,speed_n3",
                            GPU_SESSION_FAIL="backward")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _returned_files(out)
    steps = {row["step"]: row["rc"] for row in summary["steps"]}
    assert steps == {"env": "0", "backward": "1", "speed_n3": "0"}, steps
    assert "backward" not in summary["results"]  # it wrote nothing: its log says why
    assert summary["results"]["env"]["torch"] and summary["results"]["speed_n3"]["rows"]
    assert "fails on purpose" in _logs(out)["backward.log"]
    assert "| backward | FAILED (rc 1) |" in (out / "summary.md").read_text()


def test_a_hanging_step_is_killed_at_its_timeout(tmp_path):
    out = tmp_path / "out"
    res, summary = _dry_run(out, GPU_SESSION_STEPS="env,backward",
                            GPU_SESSION_FAIL="env:hang", GPU_SESSION_STEP_TIMEOUT="12")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = {row["step"]: row for row in summary["steps"]}
    assert steps["env"]["rc"] == "124" and steps["env"]["timeout"] == "12"
    assert steps["backward"]["rc"] == "0"
    assert "TIMED OUT after 12 s" in (out / "summary.md").read_text()


def test_the_time_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "out"
    res, summary = _dry_run(out, GPU_SESSION_STEPS="env,backward", GPU_SESSION_BUDGET="15")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = {row["step"]: row for row in summary["steps"]}
    # 15 s less the 10 s kept for packing: no step can start
    assert steps["env"]["rc"] == "skipped" and steps["backward"]["rc"] == "skipped"
    assert "SKIPPED (time budget)" in (out / "summary.md").read_text()


def test_precompile_shards_partition_the_calls_by_family():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_session as gs

    calls = gs.session_calls()
    assert {c[0] for c in calls} >= {"tests", "sanitizer", "speed", "speed_n3", "pipeline",
                                     "backward"}
    for k in (1, 2, 14):
        shards = [gs.shard_calls(calls, i, k) for i in range(k)]
        assert sorted(map(id, (c for s in shards for c in s))) == sorted(map(id, calls))
        owner = {}
        for i, shard in enumerate(shards):
            assert shard, (k, i)
            for c in shard:
                assert owner.setdefault(gs._variant_family(c[2]), i) == i  # not split
