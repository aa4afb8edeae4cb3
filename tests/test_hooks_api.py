"""maxfusion_hooks on raw PyTorch models: the lockstep engine, the handle, errors and faults.

One file (over 400 lines) because the engine, handle, error and fault tests all compare against
the same hand-written float64 lockstep below.

The reference for block level is a lockstep written out by hand with the float64 reference
(``reference.max_fuse(..., unmerge=True)`` between the stages); the models run in float64 so
that the comparison is tight and no decision is near a tie.
"""

from __future__ import annotations

import contextvars
import json
import subprocess
import sys

import pytest
import torch
from tiny_models import TwoStage, single_thread_fixture

import maxfusion_hooks as mh
from maxfusion_kernels import reference

single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)

TORCH = dict(backend="torch")


def _models(n=2, head=True, dtype=torch.float64):
    return [TwoStage(seed=k, head=head).to(dtype).eval().requires_grad_(False)
            for k in range(n)]


def _inputs(n=2, batch=2, size=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g, dtype=dtype) for _ in range(n)]


def _by_hand(models, xs, **opts):
    """The lockstep of TwoStage models written out: unmerge after stage 1, merge at the end."""
    h1 = [m.stage1(x) for m, x in zip(models, xs)]
    g, info1 = reference.max_fuse(h1, unmerge=True, return_info=True, **opts)
    outs = []
    for m, gi in zip(models, g):
        h2 = m.stage2(gi)
        outs.append(m.head(h2) if m.head is not None else h2)
    merged, info2 = reference.max_fuse(outs, return_info=True, **opts)
    return merged, info1, info2


# ---------------------------------------------------------------------------------- import


def test_import_is_light():
    probe = (
        "import json, sys, torch, maxfusion_hooks\n"
        "print(json.dumps({'cuda': torch.cuda.is_initialized(), 'mods': sorted(m for m in "
        "sys.modules if m.split('.')[0] in ('diffusers', 'greenlet', 'transformers'))}))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"cuda": False, "mods": []}


# ------------------------------------------------------------------------- block level math


@pytest.mark.parametrize("head", [True, False])
def test_block_level_equals_hand_written_lockstep(head):
    models, xs = _models(head=head), _inputs()
    # without a head the output is stage 2's: name stage2 as a point too, to check that an
    # output which is a fused stream is merged from the features that entered that fusion
    points = ["stage1"] if head else ["stage1", "stage2"]
    with mh.apply(models, level="block", record=True, preset="reference", points=points,
                  **TORCH) as h:
        out = h.run(xs)
    ref, info1, info2 = _by_hand(models, xs, preset="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    rec = {r.point: r.winner for r in h.records}
    assert torch.equal(rec["stage1"], info1.winner)
    assert torch.equal(rec["out"], info2.winner)
    # both branches of the fusion happen, or the comparison would prove little
    assert 0 < int(info1.winner.sum()) < info1.winner.numel()
    assert [r.step for r in h.records] == [0] * len(h.records)


def test_block_level_differs_from_residual_level():
    models, xs = _models(), _inputs()
    with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
        block = h.run(xs)
    with mh.apply(models, level="residual", **TORCH) as h:
        resid = h.run(xs)
    outs = [m(x) for m, x in zip(models, xs)]
    torch.testing.assert_close(resid, reference.max_fuse(outs), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(block, resid)


def test_predicate_points_equal_named_points():
    models, xs = _models(), _inputs()
    with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
        a = h.run(xs)
    with mh.apply(models, level="block", points=lambda name, m: name == "stage1",
                  **TORCH) as h:
        b = h.run(xs)
    assert torch.equal(a, b)


def test_identical_models_are_the_identity():
    m = _models(1, dtype=torch.float32)[0]
    x = _inputs(1, dtype=torch.float32)[0]
    alone = m(x)
    for level, kw in (("residual", {}), ("block", {"points": ["stage1", "stage2.0"]})):
        with mh.apply([m, m], level=level, **kw, **TORCH) as h:
            assert torch.equal(h.run([x, x]), alone)


def test_model_order_changes_nothing():
    models, xs = _models(), _inputs()
    with mh.apply(models, level="block", record=True, points=["stage1"], **TORCH) as h:
        a = h.run(xs)
    with mh.apply(models[::-1], level="block", record=True, points=["stage1"], **TORCH) as h2:
        b = h2.run(xs[::-1])
    assert torch.equal(a, b)
    # records name the models by their index in the list: reversed list, complementary maps
    for ra, rb in zip(h.records, h2.records):
        assert ra.point == rb.point and torch.equal(ra.winner, 1 - rb.winner)


def test_run_weights_scale_outputs_and_zero_skips_a_model():
    models, xs = _models(3), _inputs(3)
    calls = []
    hook = models[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
            out = h.run(xs, weights=[2.0, 0.5, 0.0])
        with mh.apply(models[:2], level="block", points=["stage1"], **TORCH) as h:
            h.run(xs[:2])  # the same lockstep without model 2
            plain = [None, None]
    finally:
        hook.remove()
    assert calls == []  # weight 0: not run at all
    ref_outs = []
    h1 = [m.stage1(x) for m, x in zip(models[:2], xs[:2])]
    g = reference.max_fuse(h1, unmerge=True)
    for m, gi in zip(models[:2], g):
        ref_outs.append(m.head(m.stage2(gi)))
    ref = reference.max_fuse(ref_outs, weights=[2.0, 0.5])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    del plain


# ------------------------------------------------------------------------------ handle


def test_remove_restores_bitwise_and_twice_is_harmless():
    models, xs = _models(), _inputs()
    before = [m(x) for m, x in zip(models, xs)]
    h = mh.apply(models, level="block", points=["stage1", "stage2"], **TORCH)
    assert all(len(m.stage1._forward_hooks) == 1 for m in models)
    h.run(xs)
    # outside a lockstep run the hooks do nothing: a model called on its own is unchanged
    assert torch.equal(models[0](xs[0]), before[0])
    h.remove()
    h.remove()
    assert not h.active
    assert all(not m.stage1._forward_hooks and not m.stage2._forward_hooks for m in models)
    after = [m(x) for m, x in zip(models, xs)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(RuntimeError, match="removed"):
        h.run(xs)


def test_apply_twice_is_an_error_until_removed():
    models = _models()
    with mh.apply(models, level="block", points=["stage1"], **TORCH):
        with pytest.raises(mh.AlreadyAppliedError, match="already patched"):
            mh.apply(models, level="residual")
        with pytest.raises(mh.AlreadyAppliedError):
            mh.apply([models[1], _models(1)[0]], level="block", points=["stage1"])
    # after the with-block the models can be patched again
    mh.apply(models, level="residual").remove()


def test_records_and_steps():
    models, xs = _models(), _inputs()
    with mh.apply(models, level="block", record=True, points=["stage1"], **TORCH) as h:
        for _ in range(3):
            h.run(xs)
        assert h.steps == 3
        assert [(r.step, r.point) for r in h.records] == [
            (s, p) for s in range(3) for p in ("stage1", "out")]
        w = h.records[0].winner
        assert w.dtype == torch.int64 and w.shape == (2, 8, 8)
        assert set(w.unique().tolist()) <= {0, 1}
        h.clear_records()
        assert h.records == []
    with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
        h.run(xs)
        assert h.records == []  # record=False keeps nothing


# ------------------------------------------------------------------------------- errors


def test_bad_arguments_are_refused_before_any_forward():
    models = _models()
    with pytest.raises(ValueError, match="level"):
        mh.apply(models, level="blocks")
    with pytest.raises(TypeError, match="weights"):
        mh.apply(models, weights=[1, 1])
    with pytest.raises(TypeError, match="unmerge"):
        mh.apply(models, unmerge=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        mh.apply(models, treshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        mh.apply(models, threshold=2.0)
    with pytest.raises(ValueError, match="preset"):
        mh.apply(models, preset="nope")
    with pytest.raises(ValueError, match="global_pool"):
        mh.apply(models, global_pool="max")
    with pytest.raises(ValueError, match="fusion points"):
        mh.apply(models, level="block")  # raw models need points
    with pytest.raises(ValueError, match="no submodule 'stage3'"):
        mh.apply(models, level="block", points=["stage3"])
    with pytest.raises(ValueError, match="at least 2"):
        mh.apply(models[:1])
    with pytest.raises(TypeError, match="single model"):
        mh.apply(models[0])
    with pytest.raises(TypeError, match="cannot fuse"):
        mh.apply("pipeline")
    # nothing was left patched by the refused calls
    assert all(not m.stage1._forward_hooks for m in models)
    mh.apply(models, level="block", points=["stage1"]).remove()


def test_block_level_refuses_different_architectures_before_running():
    a = TwoStage(c=8).eval()
    b = TwoStage(c=16).eval()
    ran = []
    for m in (a, b):
        m.register_forward_pre_hook(lambda *x: ran.append(1))
    with pytest.raises(ValueError, match="identical architecture.*parameters"):
        mh.apply([a, b], level="block", points=["stage1"])
    assert ran == []
    c = TwoStage(head=False).eval()
    with pytest.raises(ValueError, match="identical architecture"):
        mh.apply([a, c], level="block", points=["stage1"])
    with pytest.raises(ValueError, match="identical architecture.*class"):
        mh.apply([a, torch.nn.Sequential(a.stage1)], level="block", points=["0"])
    assert not a.stage1._forward_hooks and not b.stage1._forward_hooks


def test_models_reaching_different_points_raise_a_clear_error():
    models, xs = _models(), _inputs()
    models[1].skip_stage1 = True
    try:
        with mh.apply(models, level="block", points=["stage1", "stage2"], **TORCH) as h:
            with pytest.raises(mh.LockstepError, match="different fusion points.*model 0 is at "
                               "fusion point 'stage1', model 1 at fusion point 'stage2'"):
                h.run(xs)
        # a different number of points: model 1 finishes while model 0 is still fusing
        with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
            with pytest.raises(mh.LockstepError, match="model 1 at the end of its forward"):
                h.run(xs)
            assert h._lockstep._slots == {}
        models[1].skip_stage1 = False
        with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
            torch.testing.assert_close(h.run(xs), _by_hand(models, xs)[0], rtol=1e-10,
                                       atol=1e-10)
    finally:
        models[1].skip_stage1 = False


@pytest.mark.parametrize("failing", [0, 1])
def test_exception_in_one_model_propagates_and_cleans_up(failing):
    models, xs = _models(), _inputs()
    unwound = []

    class Boom(RuntimeError):
        pass

    def explode(module, args):
        raise Boom("stage 2 failed")

    def note_exit(module, args, output):  # the other model's last module ran
        unwound.append("finished")

    handle = models[failing].stage2.register_forward_pre_hook(explode)
    other = models[1 - failing].head.register_forward_hook(note_exit)
    try:
        with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
            with pytest.raises(Boom, match="stage 2 failed"):
                h.run(xs)
            assert h._lockstep._slots == {}  # no model is left suspended in the engine
            # models run in list order between two fusion points: when model 0 fails, model 1
            # (waiting at stage1) is unwound without running on; when model 1 fails, model 0
            # had already finished
            assert unwound == ([] if failing == 0 else ["finished"])
            handle.remove()
            # the patch is intact and works on the next call
            torch.testing.assert_close(h.run(xs), _by_hand(models, xs)[0], rtol=1e-10,
                                       atol=1e-10)
            h.run(xs)
    finally:
        handle.remove()
        other.remove()
    assert all(not m.stage1._forward_hooks for m in models)


def test_fusion_error_names_the_point():
    a, b = _models()
    xs = [_inputs()[0], _inputs(size=10)[0]]  # different spatial sizes at the fusion point
    with mh.apply([a, b], level="block", points=["stage1"], **TORCH) as h:
        with pytest.raises(mh.LockstepError, match="'stage1'.*same shape"):
            h.run(xs)
        assert h._lockstep._slots == {}


# ------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference", "autocast"])
def test_caller_modes_hold_in_every_model(mode):
    models = _models(dtype=torch.float32)
    xs = _inputs(dtype=torch.float32)
    ctx = {
        "grad": torch.enable_grad(),
        "no_grad": torch.no_grad(),
        "inference": torch.inference_mode(),
        "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
    }[mode]
    for m in models:
        m.seen_modes.clear()
    with mh.apply(models, level="block", points=["stage1", "stage2.0"], **TORCH) as h:
        with ctx:
            expected = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                        torch.is_autocast_enabled("cpu"))
            out = h.run(xs)
            after = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                     torch.is_autocast_enabled("cpu"))
    assert after == expected
    assert [m.seen_modes for m in models] == [[expected], [expected]]
    assert out.dtype == (torch.bfloat16 if mode == "autocast" else torch.float32)
    assert out.is_inference() == (mode == "inference")


def test_a_model_keeps_its_own_mode_across_a_fusion_point():
    """Model 0 runs stage 1 under no_grad; the fusion point at stage1 is inside that block,
    so while model 0 waits there the others must still see the caller's grad mode."""
    models = _models(dtype=torch.float32)
    xs = _inputs(dtype=torch.float32)
    models[0].no_grad = True
    seen = {0: [], 1: []}
    hooks = [m.stage1[2].register_forward_hook(
        lambda mod, a, o, k=k: seen[k].append(torch.is_grad_enabled()))
        for k, m in enumerate(models)]
    try:
        with mh.apply(models, level="block", points=["stage1.0", "stage1"], **TORCH) as h:
            with torch.enable_grad():
                h.run(xs)
                assert torch.is_grad_enabled()
    finally:
        models[0].no_grad = False
        for hk in hooks:
            hk.remove()
    assert seen == {0: [False], 1: [True]}
    assert [m.seen_modes[-1][0] for m in models] == [True, True]


def test_caller_context_variables_are_seen_in_every_model():
    var = contextvars.ContextVar("maxfusion_test_var", default="unset")
    models, xs = _models(), _inputs()
    seen = []
    hooks = [m.stage2.register_forward_pre_hook(lambda *a: seen.append(var.get()))
             for m in models]
    token = var.set("caller")
    try:
        with mh.apply(models, level="block", points=["stage1"], **TORCH) as h:
            h.run(xs)
    finally:
        var.reset(token)
        for hk in hooks:
            hk.remove()
    assert seen == ["caller", "caller"]


def test_remove_refuses_to_clobber_a_later_patch_of_the_combiner():
    from diffusers import MultiAdapter
    from tiny_models import tiny_adapter

    multi = MultiAdapter([tiny_adapter(0), tiny_adapter(1)])
    h = mh.apply(multi, **TORCH)
    ours = multi.forward
    multi.forward = lambda *a, **k: ours(*a, **k)  # e.g. an offload hook wrapping ours
    with pytest.raises(RuntimeError, match="replaced after apply"):
        h.remove()
    assert h.active  # nothing was undone
    multi.forward = ours  # the later patch is undone first
    h.remove()
    assert not h.active and "forward" not in multi.__dict__
    h.remove()


def test_apply_refuses_a_combiner_whose_forward_is_patched_on_the_instance():
    from diffusers import MultiAdapter
    from tiny_models import tiny_adapter

    multi = MultiAdapter([tiny_adapter(0), tiny_adapter(1)])
    klass = type(multi).forward

    def theirs(*a, **k):  # an instance-level wrapper that is not accelerate's hook
        return klass(multi, *a, **k)

    multi.forward = theirs
    with pytest.raises(RuntimeError, match="already has a forward set on the instance"):
        mh.apply(multi, level="block", **TORCH)
    assert multi.__dict__["forward"] is theirs
    assert all(not m._forward_hooks for m in multi.modules())
    del multi.forward
    mh.apply(multi, level="block", **TORCH).remove()  # nothing was left claimed


def test_a_forgotten_handle_does_not_keep_models_alive():
    import gc
    import weakref

    models = _models()
    refs = [weakref.ref(m) for m in models]
    h = mh.apply(models, level="block", points=["stage1"], **TORCH)
    del h
    gc.collect()
    with pytest.raises(mh.AlreadyAppliedError):  # the hooks keep the handle alive
        mh.apply(models, level="residual")
    del models
    gc.collect()
    assert all(r() is None for r in refs)
