"""The ``maxfusion`` command: the offline demo end to end, real-model loading, info, bench, errors.

The demo runs in-process on CPU at 64 px and 2-3 steps with the torch backend (the Triton
interpreter, which conftest enables, is exact but far too slow for a whole pipeline run here;
the pipelines' default backend is tested in test_hooks_pipelines.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import single_thread_fixture

from maxfusion_hooks import cli
from maxfusion_hooks.cli.demo import (
    DemoConfig,
    DemoError,
    compose_figure,
    half_fractions,
    is_final_merge,
    region_masks,
    run_demo,
    synthetic_conditions,
)
from maxfusion_kernels import choose_backend

single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--size", "64", "--steps", "2", "--backend", "torch", "--no-progress"]
INSIDE_POINTS = ["down_blocks.0:input", "down_blocks.0[0]", "down_blocks.0[1][0]",
                 "down_blocks.1[0]", "mid_block"]


def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxfusion_hooks", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def _one_line_error(err: str, command: str = "maxfusion demo") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- offline demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "figure.png"
    return run_demo(DemoConfig(out=out, size=64, steps=3, backend="torch", progress=False))


def test_demo_writes_a_png_figure(demo):
    assert demo.figure.is_file()
    with Image.open(demo.figure) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "RGB"
        # the conditions, the image and 5 + 5 winner maps: at least 5 panels wide, 3 high
        assert im.size == compose_figure(demo).size
        assert im.width >= 5 * 176 and im.height >= 3 * 176
    assert demo.size == 64 and demo.steps == 3 and demo.names == ["depth", "edges"]
    assert demo.image.size == (64, 64)
    assert [c.size for c in demo.conditions] == [(64, 64), (64, 64)]


def test_demo_winner_maps_follow_the_conditions(demo):
    """Depth is drawn in the left half, edges in the right half: inside the ControlNets each
    condition's net wins most sites of its own half, at every step and fusion point."""
    inside = [r for r in demo.records if not is_final_merge(r.point)]
    assert [p for p in demo.points if not is_final_merge(p)] == INSIDE_POINTS
    assert len(inside) == len(INSIDE_POINTS) * 3  # every point at each of the 3 steps
    assert {r.step for r in demo.records} == {0, 1, 2}
    for r in inside:
        assert r.winner.shape[0] == 2  # both halves of classifier-free guidance
        left, right = half_fractions(r)
        assert min(left, right) >= 0.8, f"step {r.step}, {r.point}: own halves {left, right}"
    for p in INSIDE_POINTS:
        assert demo.own_half[p] >= 0.9, (p, demo.own_half[p])
        assert sum(demo.shares[p]) == pytest.approx(1.0)


def test_demo_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", *FAST, "--level", "residual", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "He-normal" in text and "random weights" in text  # how the models were made
    assert "residual level" in text and f"figure written to {out.resolve()}" in text
    # residual level: only the final merges, one table row each
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(("down.", "mid "))]
    assert [r[0] for r in rows] == ["down.0", "down.1", "down.2", "down.3", "mid"]
    assert all(r[1] == "merge" and r[2].endswith("%") for r in rows)
    with Image.open(out) as im:
        assert im.format == "PNG"


def _grey(image: Image.Image) -> torch.Tensor:
    """The image's grey values as an [H, W] tensor (np.asarray: no deprecated Pillow API)."""
    return torch.from_numpy(np.asarray(image.convert("L")).copy())


def test_synthetic_conditions_conflict_by_halves():
    (n0, depth), (n1, edges) = synthetic_conditions(64)
    assert (n0, n1) == ("depth", "edges")
    d = _grey(depth)
    e = _grey(edges)
    assert (d[:, :32] > 0).all() and (d[:, 32:] == 0).all()  # depth: all of the left half
    assert (e[:, :32] == 0).all() and (e[:, 32:] > 0).any()  # edges: lines on the right


# ------------------------------------------------------------------------- masked demo


@pytest.fixture(scope="module")
def masked_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "masks.png"
    return run_demo(DemoConfig(out=out, size=64, steps=2, backend="torch", progress=False,
                               masks=True))


def test_masked_demo_each_condition_wins_its_region(masked_demo):
    """Conditions over the whole image, restricted by masks to an ellipse and its complement:
    at every fusion point each condition wins its own region (all but the soft band at the
    ellipse's edge), far more than in the run without masks."""
    res = masked_demo
    assert res.own_half is None and len(res.masks) == 2
    assert torch.allclose(res.masks[0] + res.masks[1], torch.ones(64, 64))
    assert [p for p in res.points if not is_final_merge(p)] == INSIDE_POINTS
    assert {r.point for r in res.baseline_records} == set(res.points)
    for p in res.points:
        assert res.own_region[p] >= 0.85, (p, res.own_region[p])
        assert res.own_region[p] > res.baseline_own_region[p] + 0.1, p
    with Image.open(res.figure) as im:
        assert im.size == compose_figure(res).size and im.height >= 5 * 176  # 2 runs


def test_masked_demo_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", *FAST, "--level", "residual", "--masks"]) == 0
    text = capsys.readouterr().out
    assert "regional masks" in text and "own region" in text and "no masks" in text
    assert (tmp_path / "maxfusion-demo-masks.png").is_file()  # the default name with --masks
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(("down.", "mid "))]
    assert len(rows) == 5 and all(len(r) == 6 and r[4].endswith("%") for r in rows)
    assert all(float(r[4][:-1]) >= 85.0 for r in rows)


def test_region_masks_partition_the_image():
    two = region_masks(48, 64, 2)
    assert two[1][24, 43] == 1.0 and two[0][2, 2] == 1.0  # inside / outside the ellipse
    soft = (two[1] > 0) & (two[1] < 1)
    assert soft.any() and torch.allclose(two[0] + two[1], torch.ones(48, 64))
    three = region_masks(32, 60, 3)
    assert torch.allclose(sum(three), torch.ones(32, 60))
    assert all(float(m[0, c]) == 1.0 for m, c in zip(three, (5, 30, 55)))
    (_, depth), (_, edges) = synthetic_conditions(64, overlap=True)
    assert (_grey(depth) > 0).all()  # the whole image
    e = _grey(edges)
    assert (e[:, :32] > 0).any() and (e[:, 32:] > 0).any()


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny SD pipeline and two ControlNets saved to folders, and two condition images:
    what a user's local models look like to ``--base`` / ``--controlnet``."""
    import tiny_models as tm
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("models")
    pipe = tm.sd_controlnet_pipeline(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DDIMScheduler() defaults: diffusers' config notices
        base = StableDiffusionPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        base.save_pretrained(root / "base")
        for k, net in enumerate(pipe.controlnet.nets):
            net.save_pretrained(root / f"cn{k}")
    for name, img in synthetic_conditions(64):
        img.save(root / f"{name}.png")
    return root


def test_demo_with_local_models(saved_models, tmp_path, capsys):
    r = saved_models
    out = tmp_path / "real.png"
    argv = ["demo", *FAST, "--base", str(r / "base"), "--controlnet", str(r / "cn0"),
            "--controlnet", str(r / "cn1"), "--image", str(r / "depth.png"), "--image",
            str(r / "edges.png"), "--prompt", "a house", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "cn0" in text and "cn1" in text and "mid_block" in text
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_masked_demo_with_three_local_controlnets(saved_models, tmp_path, capsys):
    """--masks with your models: 3 ControlNets get 3 vertical strips."""
    r = saved_models
    out = tmp_path / "strips.png"
    argv = ["demo", *FAST, "--masks", "--level", "residual", "--base", str(r / "base"),
            "--out", str(out)]
    for k, img in ((0, "depth"), (1, "edges"), (0, "edges")):
        argv += ["--controlnet", str(r / f"cn{k}"), "--image", str(r / f"{img}.png")]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "strip 3 of 3 from the left" in text
    rows = [ln.split() for ln in text.splitlines() if ln.startswith(("down.", "mid "))]
    assert len(rows) == 5 and all(float(row[5][:-1]) >= 80.0 for row in rows), rows
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_a_model_that_is_not_a_controlnet(saved_models, tmp_path, capsys):
    r = saved_models
    argv = ["demo", *FAST, "--base", str(r / "base"), "--controlnet", str(r / "cn0"),
            "--controlnet", str(r / "base" / "unet"), "--image", str(r / "depth.png"),
            "--image", str(r / "edges.png"), "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "not a ControlNet" in line and "UNet2DConditionModel" in line
    # a ControlNet folder given as the base
    argv[argv.index("--base") + 1] = str(r / "cn0")
    assert cli.main(argv) == 2
    assert "not a diffusers pipeline" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_a_condition_that_is_not_an_image(saved_models, tmp_path, capsys):
    r = saved_models
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    argv = ["demo", *FAST, "--base", str(r / "base"), "--controlnet", str(r / "cn0"),
            "--controlnet", str(r / "cn1"), "--image", str(r / "depth.png"), "--image",
            str(bad), "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    assert f"--image {bad}: not an image" in _one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("argv, message", [
    (["--level", "bogus"], "invalid choice: 'bogus'"),
    (["--size", "abc"], "invalid int value"),
    (["--size", "50"], "multiple of 8"),
    (["--size", "512"], "at most 256 px"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--threshold", "1.5"], "[-1, 1]"),
    (["--device", "nonsense"], "is not a device"),
    (["--out", "/nonexistent-dir/x.png"], "does not exist"),
    (["--out", "figure.jpg"], "PNG"),
    (["--image", "a.png"], "need --base"),
    (["--base", "b", "--controlnet", "c1", "--image", "a.png", "--image", "b.png"],
     "one --image per --controlnet: got 1 --controlnet and 2 --image"),
    (["--base", "b", "--controlnet", "c1", "--image", "a.png"], "2 to 8 ControlNets"),
    (["--base", "b", "--controlnet", "c1", "--controlnet", "c2", "--image", "missing-1.png",
      "--image", "missing-2.png"], "--image missing-1.png: no such file"),
])
def test_bad_demo_arguments(argv, message, capsys):
    assert cli.main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    assert message in _one_line_error(captured.err)
    assert "building" not in captured.out  # refused before anything is built


def test_missing_model_folders(saved_models, tmp_path, capsys):
    r = saved_models
    common = ["--image", str(r / "depth.png"), "--image", str(r / "edges.png"),
              "--out", str(tmp_path / "x.png")]
    assert cli.main(["demo", "--base", str(tmp_path / "no-base"), "--controlnet",
                     str(r / "cn0"), "--controlnet", str(r / "cn1"), *common]) == 2
    assert "no such file or folder" in _one_line_error(capsys.readouterr().err)
    assert cli.main(["demo", "--base", str(r / "base"), "--controlnet", str(r / "cn0"),
                     "--controlnet", "./no-such-controlnet", *common]) == 2
    assert "--controlnet ./no-such-controlnet: no such file" in _one_line_error(
        capsys.readouterr().err)


def test_run_demo_raises_demo_error(tmp_path):
    with pytest.raises(DemoError, match="one --image per --controlnet"):
        run_demo(DemoConfig(base="b", controlnets=["a", "b"], images=["x"],
                            out=tmp_path / "x.png"))
    with pytest.raises(DemoError, match="--level"):
        run_demo(DemoConfig(level="pixel", out=tmp_path / "x.png"))


def test_no_command_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "required" in _one_line_error(capsys.readouterr().err, "maxfusion")
    assert cli.main(["paint"]) == 2
    assert "invalid choice" in _one_line_error(capsys.readouterr().err, "maxfusion")
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out


def test_bad_arguments_as_a_subprocess():
    proc = _run_module("demo", "--level", "bogus")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--level" in _one_line_error(proc.stderr)
    proc = _run_module("demo", "--base", "b", "--controlnet", "c", "--controlnet", "d",
                       "--image", "x.png")
    assert proc.returncode == 2
    assert "got 2 --controlnet and 1 --image" in _one_line_error(proc.stderr)


# ----------------------------------------------------------------------------- info, bench


def test_info_names_the_backend():
    proc = _run_module("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("torch", "triton", "diffusers", "devices:", "max_fuse backend"):
        assert name in out
    # this process has the subprocess's environment (conftest's TRITON_INTERPRET included)
    assert f"cpu tensors: {choose_backend(torch.device('cpu'))} (" in out
    if not torch.cuda.is_available():
        assert "cuda: not available" in out


def test_info_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "maxfusion_hooks", "info"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "cpu tensors: torch (the vectorised PyTorch path" in proc.stdout


def test_bench_runs_the_source_tree_script(tmp_path, capfd):
    assert cli.BENCH_SCRIPT == ROOT / "benchmarks" / "run.py"
    fake = tmp_path / "run.py"
    fake.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(3)\n")
    rc = cli.main(["bench", "--script", str(fake), "--quick", "--device", "cpu", "--out",
                   "r.json", "--", "--cases", "sd3_tokens_1024"])
    assert rc == 3  # run.py's exit code
    last = capfd.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == ["--quick", "--device", "cpu", "--out", "r.json", "--cases",
                                "sd3_tokens_1024"]


def test_bench_without_the_source_tree(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--script", str(tmp_path / "run.py")]) == 2
    assert "benchmarks/run.py" in _one_line_error(capsys.readouterr().err, "maxfusion bench")


# ----------------------------------------------------------------------------- packaging


def test_cli_and_demo_import_no_diffusers():
    probe = ("import sys, maxfusion_hooks.cli, maxfusion_hooks.cli.demo, "
             "maxfusion_hooks.cli.demo.offline_models\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('diffusers', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_console_script():
    script = Path(sys.executable).parent / "maxfusion"
    if not script.exists():
        pytest.skip("the maxfusion console script is not installed beside this python")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout and "bench" in proc.stdout

