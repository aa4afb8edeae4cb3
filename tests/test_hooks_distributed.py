"""The hook layer with sharded tokens: ``maxfusion_hooks.apply`` under diffusers' context
parallelism (Ulysses, on CPU with gloo) and with ``process_group=`` for sharded residuals.

Every test spawns 2 or 4 CPU processes (``dist_harness.run_ranks``: gloo on loopback, a hard
timeout). Each rank first computes the single-process result itself (same seeds, before any
parallelism is enabled) and then the distributed one, and compares.

Diffusers 0.42 on a CPU-only torch: ``enable_parallelism`` computes
``rank % torch.accelerator.device_count()``, which is 0 there (``ZeroDivisionError`` at
``models/modeling_utils.py:1719``), so each worker sets ``torch.accelerator.device_count =
lambda: 1`` in its own process before enabling it. Only Ulysses attention runs on CPU: ring
attention needs the attention's log-sum-exp, which the ``native`` backend refuses and the LSE
backends have no CPU kernel for. Both use the same token split (over the flattened ring x
ulysses mesh), which is all the hook depends on.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

TIMEOUT = 55  # seconds per spawned run, a hard limit

# diffusers' context parallelism (ContextParallelConfig, enable_parallelism) is recent
needs_cp = pytest.mark.skipif(
    importlib.util.find_spec("diffusers.models._modeling_parallel") is None,
    reason="this diffusers has no context parallelism (diffusers.models._modeling_parallel)")


def _cpu_context_parallel():
    """Let diffusers' enable_parallelism run on a CPU-only torch (this process only)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*enable_parallelism.*experimental")
    torch.accelerator.device_count = lambda: 1


def _prompt(batch=1, tokens=8, seed=0):
    # 8 prompt tokens: the text tokens are split over the ranks too (divisible by 2 and 4)
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, tokens, 32, generator=g),
                pooled_prompt_embeds=torch.randn(batch, 32, generator=g))


def _winners_agree(a, b):
    """Fraction of equal winners over every record (the transformer's output under Ulysses
    attention differs from one process by float rounding, so the later steps' ControlNet
    inputs do too: a near-tie may flip)."""
    assert len(a) == len(b)
    eq = total = 0
    for ra, rb in zip(a, b):
        assert ra.point == rb.point and ra.winner.shape == rb.winner.shape
        eq += int((ra.winner == rb.winner).sum())
        total += ra.winner.numel()
    return eq / max(total, 1)


# --------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------


def _flux_pipeline_worker(rank, world, level):
    """A tiny FluxControlNetPipeline with two ControlNets and MaxFusion, one process vs
    diffusers' context parallelism over ``world`` ranks (Ulysses)."""
    _cpu_context_parallel()
    import tiny_models as tm
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ContextParallelInput

    import maxfusion_hooks as mh
    from maxfusion_hooks._parallel import plan_splits_residuals

    conds = tm.strip_conditions(2, 32)

    def call(pipe):
        return pipe(control_image=conds, controlnet_conditioning_scale=[1.0, 0.7],
                    num_inference_steps=2, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **_prompt()).images

    def fused(pipe):
        with mh.apply(pipe, level=level, record=True) as h:
            out = call(pipe)
        return out, h.records

    pipe = tm.flux_controlnet_pipeline(2, heads=4)
    # applied before parallelism is enabled: the hook looks the transformer's config up per call
    with mh.apply(pipe, level=level, record=True) as h:
        ref = call(pipe)  # one process
        ref_records = list(h.records)
        h.clear_records()
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        out = call(pipe)  # the hook cuts every fused residual to this rank's tokens
        records = h.records
    report = {"diffusers_splits": plan_splits_residuals(pipe.transformer),
              "maxdiff": float((out - ref).abs().max()),
              "winners_equal": _winners_agree(records, ref_records), "records": len(records)}
    # diffusers alone (after remove()): the full residuals do not fit the transformer's shards
    try:
        call(pipe)
        report["diffusers_alone"] = "ran"
    except RuntimeError as e:
        report["diffusers_alone"] = str(e)
    # a transformer plan extended to split the residuals itself (Recipe A): nothing is cut
    pipe2 = tm.flux_controlnet_pipeline(2, heads=4)
    tr = pipe2.transformer
    plan = dict(type(tr)._cp_plan)
    split = ContextParallelInput(split_dim=1, expected_dims=3)
    plan[""] = {**plan[""], "controlnet_block_samples": [split],
                "controlnet_single_block_samples": [split]}
    tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=plan)
    out2, _ = fused(pipe2)
    report["extended_plan_maxdiff"] = float((out2 - ref).abs().max())
    return report


def _flux_inputs(batch=2, seed=0):
    """A Flux ControlNet's inputs: 8 x 8 image tokens, 8 text tokens (divisible by 4)."""
    import tiny_models as tm

    kw = tm.flux_inputs(batch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    kw["encoder_hidden_states"] = torch.randn(batch, 8, 32, generator=g)
    kw["txt_ids"] = torch.zeros(8, 3)
    return kw


def _recipe_b_worker(rank, world, level):
    """Sharded ControlNets (each rank runs them on its own tokens, with Ulysses attention):
    their residuals come out sharded, and ``apply(combiner, process_group=...)`` fuses them
    with the normalisers summed over the ranks. Each rank's fused residuals equal its slice of
    the single-process fusion."""
    _cpu_context_parallel()
    import tiny_models as tm
    from diffusers import ContextParallelConfig, FluxMultiControlNetModel

    import maxfusion_hooks as mh

    nets = [tm.tiny_flux_controlnet(1 + k, heads=4) for k in range(2)]
    combiner = FluxMultiControlNetModel(nets)
    inp = _flux_inputs()
    conds = tm.flux_token_conditions(2)
    kw = dict(controlnet_cond=conds, controlnet_mode=None, conditioning_scale=[1.0, 0.8],
              return_dict=False)
    with torch.no_grad():
        with mh.apply(combiner, level=level, record=True) as h:
            ref = combiner(**kw, **inp)
        ref_records = h.records
        for net in nets:  # CP attention in the nets' processors, no split hooks
            net.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world),
                                   cp_plan={})
        mesh = nets[0]._parallel_config.context_parallel_config._flattened_mesh
        group = mesh.get_group()

        def mine(x, dim):  # the share diffusers' split hooks give this rank
            return x.chunk(world, dim)[rank]

        local_inp = dict(inp, hidden_states=mine(inp["hidden_states"], 1),
                         encoder_hidden_states=mine(inp["encoder_hidden_states"], 1),
                         img_ids=mine(inp["img_ids"], 0), txt_ids=mine(inp["txt_ids"], 0))
        local_kw = dict(kw, controlnet_cond=[mine(c, 1) for c in conds])
        with mh.apply(combiner, level=level, record=True, process_group=group) as h:
            blocks, singles = combiner(**local_kw, **local_inp)
        records = h.records
        # without the group each rank would normalise over its own tokens only
        with mh.apply(combiner, level=level) as h:
            alone, _ = combiner(**local_kw, **local_inp)
    full = list(ref[0]) + list(ref[1])
    got = list(blocks) + list(singles)
    diffs = [float((g - mine(f, 1)).abs().max()) for g, f in zip(got, full)]
    scale = max(float(f.abs().max()) for f in full)
    ref_local = [r._replace(winner=mine(r.winner, 1)) for r in ref_records]
    return {"maxdiff": max(diffs), "scale": scale,
            "winners_equal": _winners_agree(records, ref_local),
            "alone_maxdiff": float((alone[0] - mine(ref[0][0], 1)).abs().max()),
            "records": len(records), "shape": tuple(got[0].shape)}


class TokenBranch(nn.Module):
    """A raw per-token control branch ``[B, L, 8] -> [B, L, 16]`` (two stages, no mixing of
    tokens, so a shard of tokens gives exactly the shard of the features)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.stage1 = nn.Sequential(nn.Linear(8, 16), nn.GELU())
        self.stage2 = nn.Linear(16, 16)

    def forward(self, x):
        return self.stage2(self.stage1(x))


def _raw_worker(rank, world):
    """``apply([models], channel_dim=-1, process_group=...)`` on raw token models, both levels:
    each rank's result equals its slice of the single-process one; masks are refused."""
    import torch.distributed as dist

    import maxfusion_hooks as mh

    group = dist.group.WORLD
    models = [TokenBranch(1), TokenBranch(2)]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 8, generator=g)]
    xs[0][:, :15] *= 4.0  # model 0 is strong on the first half: shards alone would differ
    splits = [14, 16] if world == 2 else [9, 0, 13, 8]
    start = sum(splits[:rank])
    mine = [x[:, start:start + splits[rank]] for x in xs]
    report = {}
    for level in ("residual", "block"):
        pts = dict(points=["stage1"]) if level == "block" else {}
        with torch.no_grad():
            with mh.apply(models, level=level, channel_dim=-1, **pts) as h:
                full = h.run([(x,) for x in xs], weights=[1.0, 0.5])
            with mh.apply(models, level=level, channel_dim=-1, process_group=group, **pts) as h:
                local = h.run([(x,) for x in mine], weights=[1.0, 0.5])
        want = full[:, start:start + splits[rank]]
        report[level] = float((local - want).abs().max()) if local.numel() else 0.0
    try:
        mh.apply(models, channel_dim=-1, process_group=group, masks=[None, None])
        report["masks"] = "accepted"
    except ValueError as e:
        report["masks"] = str(e)
    with mh.apply(models, channel_dim=-1, process_group=group) as h:
        try:
            h.set_masks([None, torch.ones(4, 4)])
            report["set_masks"] = "accepted"
        except ValueError as e:
            report["set_masks"] = str(e)
    return report


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@needs_cp
@pytest.mark.parametrize(("world", "level"), [(2, "residual"), (2, "block"), (4, "residual")])
def test_flux_pipeline_under_context_parallelism(world, level):
    reports = run_ranks(_flux_pipeline_worker, world, level, timeout=TIMEOUT)
    for r in reports:
        # diffusers (0.42) alone cannot run a Flux ControlNet pipeline under CP: its plan
        # does not split the residuals (should a later version split them, the hook must
        # leave them whole, which the extended-plan run below checks)
        assert "must match the size" in r["diffusers_alone"] or r["diffusers_splits"], r
        # with the hook it runs, and matches one process (Ulysses attention: rounding; the
        # measured difference is 1e-7 to 2.4e-7)
        assert r["maxdiff"] < 1e-5, r
        assert r["extended_plan_maxdiff"] < 1e-5, r
        assert r["records"] > 0 and r["winners_equal"] > 0.99, r


@needs_cp
@pytest.mark.parametrize(("world", "level"), [(2, "residual"), (2, "block"), (4, "residual")])
def test_sharded_flux_controlnets_with_process_group(world, level):
    reports = run_ranks(_recipe_b_worker, world, level, timeout=TIMEOUT)
    for r in reports:
        assert r["shape"][1] == 64 // world, r
        # measured: 1e-6 to 2e-6 on residuals of magnitude 25 to 47
        assert r["maxdiff"] < 1e-6 * max(1.0, r["scale"]), r
        assert r["records"] > 0 and r["winners_equal"] > 0.99, r
    # the premise: fused with each rank's own normaliser, the residuals differ somewhere
    assert max(r["alone_maxdiff"] for r in reports) > 1e-3


@pytest.mark.parametrize("world", [2, 4])
def test_raw_models_with_process_group(world):
    for r in run_ranks(_raw_worker, world, timeout=TIMEOUT):
        assert r["residual"] < 1e-5 and r["block"] < 1e-5, r
        assert "not supported with process_group" in r["masks"]
        assert "not supported with process_group" in r["set_masks"]


@needs_cp
def test_the_docs_torchrun_example():
    """docs/examples/multi_gpu_flux.py under torchrun with 2 CPU processes (gloo), as quoted
    in docs/integration.md (``--standalone``: a free rendezvous port on localhost)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(root / "docs" / "examples" / "multi_gpu_flux.py")]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-4000:]
    diffs = [float(x) for x in re.findall(r"over the ranks = ([0-9.e+-]+)", out)]
    assert len(diffs) == 2 and diffs[0] < 1e-5 and diffs[1] < 1e-5, out
    assert "80 bytes" in out and "each rank's transformer gets 32 of them" in out, out


def test_apply_checks_the_process_group():
    import maxfusion_hooks as mh

    models = [TokenBranch(1), TokenBranch(2)]
    with pytest.raises(TypeError, match="ProcessGroup"):
        mh.apply(models, channel_dim=-1, process_group="world")
