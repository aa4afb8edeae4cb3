"""Pipeline behaviours users rely on, with several ControlNets fused, at both levels.

One file (over 400 lines) because every behaviour is tested on the same tiny pipelines and
fixtures.

Tiny SD 1.5-style ControlNet pipelines (32 px, 2 denoising steps, torch backend):
``control_guidance_start`` / ``control_guidance_end`` per net (a net outside its window takes
no part in the competition), ``guess_mode``, ``num_images_per_prompt > 1``, a batch of
prompts, ``callback_on_step_end``, every ``output_type``, model CPU offload (accelerate's hooks
around the patched combiner, in either order) and float16 weights on the CPU.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import tiny_models as tm
import torch
from tiny_models import single_thread_fixture

import maxfusion_hooks as mh

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)

TORCH = dict(backend="torch")
LEVELS = ["residual", "block"]
PROMPT = "a red cat"
# a batch of 2 against 1 runs other conv / matmul kernels: float rounding differs
CLOSE = dict(rtol=1e-4, atol=1e-4)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(pipe, conds, **kw):
    kw.setdefault("output_type", "latent")
    kw.setdefault("generator", _gen())
    return pipe(kw.pop("prompt", PROMPT), image=conds, num_inference_steps=2, height=32,
                width=32, **kw).images


def _final(point: str) -> bool:
    """Whether a record is of a final merge (residual names) rather than a fusion inside."""
    return re.fullmatch(r"down\.\d+|mid", point) is not None


def _strip_fractions(winner, n, swapped=False):
    """Per strip k, the fraction of its sites won by net k (or by net n-1-k when swapped)."""
    out = []
    for k, m in enumerate(tm.strip_masks(n, winner.shape[-2:])):
        own = n - 1 - k if swapped else k
        out.append(float((winner[..., m] == own).float().mean()))
    return out


class CombinerCalls:
    """Every call of a pipeline's combiner: ``(args, kwargs, output)``, in order."""

    def __init__(self, combiner):
        self.calls: list[tuple] = []
        self._h = combiner.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls.append((args, dict(kwargs), output))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


def _flat(out) -> list[torch.Tensor]:
    down, mid = out
    return list(down) + [mid]


@pytest.fixture(scope="module")
def pipe3():
    return tm.sd_controlnet_pipeline(3)


@pytest.fixture(scope="module")
def pipe2():
    return tm.sd_controlnet_pipeline(2)


# ------------------------------------------------------------ control_guidance_start / end


@pytest.mark.parametrize("level", LEVELS)
def test_a_net_outside_its_guidance_window_takes_no_part(pipe3, level):
    """Windows per net: net 1 starts at 0.5 (out at step 0), net 2 ends at 0.5 (out at step 1).
    diffusers passes such a net a scale of exactly 0 (``scale * keep``); the hooks remove it:
    at every step the fused residuals equal (bitwise) those of a combiner of the other nets
    alone, at both levels, and the removed net is not run."""
    from diffusers import MultiControlNetModel

    conds = tm.strip_conditions(3, 48)
    nets = list(pipe3.controlnet.nets)
    copies = [copy.deepcopy(n) for n in nets]  # before apply: no hooks copied
    calls = [0, 0, 0]
    hooks = [n.register_forward_pre_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, n in enumerate(nets)]
    window = dict(control_guidance_start=[0.0, 0.5, 0.0], control_guidance_end=[1.0, 1.0, 0.5],
                  controlnet_conditioning_scale=[1.0, 0.8, -0.6])  # -0.6 * 0 is -0.0
    try:
        with CombinerCalls(pipe3.controlnet) as seen, \
                mh.apply(pipe3, level=level, record=True, **TORCH) as h:
            fused = _run(pipe3, conds, **window)
    finally:
        for hk in hooks:
            hk.remove()
    assert calls == [2, 1, 1]
    scales = [c[1]["conditioning_scale"] for c in seen.calls]
    assert scales == [[1.0, 0.0, -0.6], [1.0, 0.8, 0.0]]
    assert math.copysign(1.0, scales[1][2]) == -1.0  # -0.0: removed as well
    assert {int(v) for r in h.records if r.step == 0 for v in r.winner.unique()} <= {0, 2}
    assert {int(v) for r in h.records if r.step == 1 for v in r.winner.unique()} <= {0, 1}
    # every net won somewhere at the steps it took part in (it competed)
    assert {int(v) for r in h.records if r.step == 0 for v in r.winner.unique()} == {0, 2}
    for step, active in [(0, [0, 2]), (1, [0, 1])]:
        args, kwargs, out = seen.calls[step]
        pair = MultiControlNetModel([copies[k] for k in active])
        kw = {**kwargs, "controlnet_cond": [kwargs["controlnet_cond"][k] for k in active],
              "conditioning_scale": [kwargs["conditioning_scale"][k] for k in active]}
        with mh.apply(pair, level=level, **TORCH):
            alone = pair(*args, **kw)
        for a, b in zip(_flat(out), _flat(alone)):
            assert torch.equal(a, b), f"step {step}: not the fusion of nets {active} alone"
    assert torch.isfinite(fused).all()


def test_a_scale_of_zero_is_removal_not_a_zero_that_competes(pipe3):
    """A zero residual that competed would win the sites where every net has std 0 (the
    smallest index wins a tie of saliencies 0) and zero them; removed, it cannot. Net 0 at
    scale 0 versus nets 1 and 2 alone, on inputs with constant (std 0) vectors there."""
    from diffusers import MultiControlNetModel

    nets = [copy.deepcopy(n) for n in pipe3.controlnet.nets]
    multi = MultiControlNetModel(nets)
    pair = MultiControlNetModel([copy.deepcopy(nets[1]), copy.deepcopy(nets[2])])
    conds = tm.strip_conditions(3, 32, batch=2)
    kw = tm.unet_inputs()
    with torch.no_grad():
        with mh.apply(multi, **TORCH):
            three = multi(**kw, controlnet_cond=conds, conditioning_scale=[0.0, 1.0, 1.0],
                          return_dict=False)
        with mh.apply(pair, **TORCH):
            two = pair(**kw, controlnet_cond=conds[1:], conditioning_scale=[1.0, 1.0],
                       return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(_flat(three), _flat(two)))
    # what a competing zero would have done: max_fuse with the zero net included
    from maxfusion_kernels import max_fuse
    flat = [_flat(n(**kw, controlnet_cond=c, conditioning_scale=s, return_dict=False))
            for n, c, s in zip(nets, conds, [0.0, 1.0, 1.0])]
    mid = [f[-1] for f in flat]
    mid[1] = mid[1].clone()
    mid[2] = mid[2].clone()
    mid[1][..., 0, 0] = 1.0  # a constant vector in both nets at one site: std 0 everywhere
    mid[2][..., 0, 0] = 1.0
    competing = max_fuse(mid, backend="torch")
    removed = max_fuse(mid[1:], backend="torch")
    assert float(competing[..., 0, 0].detach().abs().max()) == 0.0  # the zero won the tie
    assert torch.equal(removed[..., 0, 0], torch.ones_like(removed[..., 0, 0]))
    # docs/spec.md: a weight of 0 removes the input (the kernels, both backends)
    raw = [f.clone() for f in mid]
    raw[0] = torch.randn_like(raw[0])  # whatever net 0 holds, its weight 0 removes it
    for backend in ("torch", "auto"):
        w0 = max_fuse(raw, weights=[0.0, 1.0, 1.0], backend=backend)
        torch.testing.assert_close(w0, max_fuse(raw[1:], backend=backend))


# ------------------------------------------------------------------------------ guess_mode


@pytest.mark.parametrize("level", LEVELS)
def test_guess_mode(pipe2, level):
    """With guess_mode and classifier-free guidance the pipeline runs the ControlNets on the
    conditional half only, each scaling its residuals by its own ramp (0.1 .. 1): the fused
    residuals equal the fusion of the nets called with guess_mode (a list-of-models handle),
    and differ from a fusion without it."""
    conds = tm.strip_conditions(2, 32)
    copies = [copy.deepcopy(n) for n in pipe2.controlnet.nets]
    with CombinerCalls(pipe2.controlnet) as seen, \
            mh.apply(pipe2, level=level, record=True, **TORCH) as h:
        fused = _run(pipe2, conds, guess_mode=True, guidance_scale=5.0)
    plain = _run(pipe2, conds, guess_mode=True, guidance_scale=5.0)
    assert torch.isfinite(fused).all() and not torch.allclose(fused, plain)
    args, kwargs, out = seen.calls[0]
    assert kwargs["guess_mode"] is True and args[0].shape[0] == 1  # the conditional half
    assert all(r.winner.shape[0] == 1 for r in h.records)
    sample, t = args
    common = dict(sample=sample, timestep=t, encoder_hidden_states=kwargs[
        "encoder_hidden_states"], return_dict=False)
    per_net = [dict(common, controlnet_cond=c, conditioning_scale=s)
               for c, s in zip(kwargs["controlnet_cond"], kwargs["conditioning_scale"])]
    results = {}
    for gm in (True, False):
        with mh.apply(copies, level=level, **TORCH) as lh:
            results[gm] = lh.run([(), ()], [dict(k, guess_mode=gm) for k in per_net])
    assert all(torch.equal(a, b) for a, b in zip(_flat(out), _flat(results[True])))
    assert not torch.allclose(out[0][0], results[False][0][0])
    for r in h.records:
        if level == "residual":
            assert min(_strip_fractions(r.winner, 2)) >= 0.8, r.point


# --------------------------------------------------------- num_images_per_prompt, prompts


def _latents(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 4, 16, 16, generator=_gen(seed))


def _assert_per_image(both_calls, alone_calls, n_images):
    """The combiner outputs of a batched run, per image, equal those of the image run alone
    (CFG batches: [uncond images, cond images] and [uncond, cond])."""
    for k, calls in enumerate(alone_calls):
        for step, ((_, _, out), (_, _, solo)) in enumerate(zip(both_calls, calls)):
            for a, b in zip(_flat(out), _flat(solo)):
                where = f"image {k}, step {step}"
                torch.testing.assert_close(a[[k, n_images + k]], b, **CLOSE,
                                           msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.parametrize("level", LEVELS)
def test_num_images_per_prompt(pipe2, level):
    """Two images per prompt: every image is fused on its own (the per-sample normaliser),
    so each image's fused residuals and latents equal the same image made alone."""
    conds = tm.strip_conditions(2, 32)
    lat = _latents(2)
    with mh.apply(pipe2, level=level, record=True, **TORCH) as h:
        with CombinerCalls(pipe2.controlnet) as both_calls:
            both = _run(pipe2, conds, num_images_per_prompt=2, latents=lat)
        alone_calls = []
        for k in range(2):
            with CombinerCalls(pipe2.controlnet) as c:
                alone = _run(pipe2, conds, latents=lat[k:k + 1])
            torch.testing.assert_close(both[k:k + 1], alone, **CLOSE)
            alone_calls.append(c.calls)
    assert both.shape == (2, 4, 16, 16)
    assert h.records[0].winner.shape == (4, 16, 16)  # [uncond x 2, cond x 2]
    _assert_per_image(both_calls.calls, alone_calls, 2)
    assert not torch.equal(both_calls.calls[0][2][1][2], both_calls.calls[0][2][1][3])


@pytest.mark.parametrize("level", LEVELS)
def test_a_batch_of_prompts_with_their_own_conditions(pipe2, level):
    """Two prompts, each with its own control images (the second's strips swapped): every
    sample follows its own conditions, and equals the prompt run alone."""
    a = tm.strip_conditions(2, 32)
    conds = [torch.cat([a[0], a[1]]), torch.cat([a[1], a[0]])]  # prompt 1: swapped
    prompts = ["a red cat", "a blue dog"]
    lat = _latents(2)
    with mh.apply(pipe2, level=level, record=True, **TORCH) as h:
        with CombinerCalls(pipe2.controlnet) as both_calls:
            both = _run(pipe2, conds, prompt=prompts, latents=lat)
        alone_calls = []
        for k in range(2):
            with CombinerCalls(pipe2.controlnet) as c:
                alone = _run(pipe2, [c_[k:k + 1] for c_ in conds], prompt=prompts[k],
                             latents=lat[k:k + 1])
            torch.testing.assert_close(both[k:k + 1], alone, **CLOSE)
            alone_calls.append(c.calls)
    _assert_per_image(both_calls.calls, alone_calls, 2)
    batched = [r for r in h.records if r.winner.shape[0] == 4]
    assert len(batched) == len(h.records) // 3  # 2 steps batched, 2 x 2 steps alone
    for r in batched:
        if level == "block" and _final(r.point):
            continue  # final merges of already fused streams: not a test of the conditions
        # CFG batch [uncond 0, uncond 1, cond 0, cond 1]: entries 1 and 3 are swapped
        for b, swapped in [(0, False), (1, True), (2, False), (3, True)]:
            fr = _strip_fractions(r.winner[b], 2, swapped)
            assert min(fr) >= 0.8, (r.point, b, fr)


# ----------------------------------------------------------------- callback_on_step_end


@pytest.mark.parametrize("level", LEVELS)
def test_callback_on_step_end(pipe2, level):
    """The callback runs after each step's fusions (it sees that step's records), may change
    the latents (honoured), and may change the handle's masks for the next steps."""
    conds = tm.strip_conditions(2, 32)
    left = torch.zeros(32, 32)
    left[:, :16] = 1
    seen = []

    def callback(pipe, i, t, kw):
        seen.append((i, h.steps, sorted({r.step for r in h.records}),
                     [tuple(c.shape) for c in kw["image"]]))
        if i == 0:
            h.set_masks([1 - left, left])  # step 1: net 0 on the right, net 1 on the left
            return {"latents": kw["latents"] * 0.5}
        return {}

    with mh.apply(pipe2, level=level, record=True, **TORCH) as h:
        out = _run(pipe2, conds, callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "image"])
        h.set_masks(None)
        no_change = _run(pipe2, conds)
    assert seen == [(0, 1, [0], [(2, 3, 32, 32)] * 2), (1, 2, [0, 1], [(2, 3, 32, 32)] * 2)]
    assert not torch.allclose(out, no_change)
    for r in h.records:
        if r.step == 0 and not (level == "block" and _final(r.point)):
            assert min(_strip_fractions(r.winner, 2)) >= 0.8, r.point
        elif r.step == 1:
            cols = torch.arange(r.winner.shape[-1])
            expected = (cols < r.winner.shape[-1] // 2).long().expand_as(r.winner)
            assert torch.equal(r.winner, expected), r.point  # the masks decide everywhere


# ------------------------------------------------------------------------- output_type


@pytest.mark.parametrize("level", LEVELS)
def test_output_types(pipe2, level):
    """latent, pt, np and pil outputs of one fused run agree: pt is the decoded latents, np
    the same values channels-last, pil the same rounded to uint8."""
    conds = tm.strip_conditions(2, 32)
    with mh.apply(pipe2, level=level, **TORCH):
        out = {t: _run(pipe2, conds, output_type=t) for t in ("latent", "pt", "np", "pil")}
    plain_pt = _run(pipe2, conds, output_type="pt")
    lat = out["latent"]
    assert lat.shape == (1, 4, 16, 16)
    with torch.no_grad():
        decoded = pipe2.vae.decode(lat / pipe2.vae.config.scaling_factor, return_dict=False)[0]
    expected = pipe2.image_processor.postprocess(decoded, output_type="pt")
    assert out["pt"].shape == (1, 3, 32, 32)
    torch.testing.assert_close(out["pt"], expected)
    assert not torch.allclose(out["pt"], plain_pt)
    assert isinstance(out["np"], np.ndarray) and out["np"].shape == (1, 32, 32, 3)
    np.testing.assert_allclose(out["np"][0], out["pt"][0].permute(1, 2, 0).numpy(), atol=1e-6)
    pil = out["pil"][0]
    assert pil.size == (32, 32) and pil.mode == "RGB"
    diff = np.abs(np.asarray(pil).astype(np.float32) - out["np"][0] * 255)
    assert diff.max() <= 1.0


# -------------------------------------------------------------------- model CPU offload


def _hooked(pipe) -> bool:
    return hasattr(pipe.controlnet, "_hf_hook")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("order", ["offload_then_apply", "apply_then_offload"])
def test_model_cpu_offload(level, order):
    """``enable_model_cpu_offload(device="cpu")`` (diffusers refuses it without a device
    argument when there is no accelerator) wraps the combiner's forward in accelerate's hook,
    which calls ``module._old_forward``; the pipeline re-installs the hooks at the end of every
    call. Either order works: the fused result equals the one without offload, ``remove()``
    restores the plain pipeline with the hooks still on, and offload keeps working after."""
    pipe = tm.sd_controlnet_pipeline(2)
    conds = tm.strip_conditions(2, 32)
    plain = _run(pipe, conds)
    with mh.apply(pipe, level=level, **TORCH):
        fused = _run(pipe, conds)
    if order == "offload_then_apply":
        pipe.enable_model_cpu_offload(device="cpu")
        h = mh.apply(pipe, level=level, record=True, **TORCH)
    else:
        h = mh.apply(pipe, level=level, record=True, **TORCH)
        pipe.enable_model_cpu_offload(device="cpu")
    assert _hooked(pipe)
    for _ in range(2):  # the second call runs under the hooks re-installed by the first
        assert torch.equal(_run(pipe, conds), fused)
    assert h.steps == 4 and _hooked(pipe)
    h.remove()
    assert torch.equal(_run(pipe, conds), plain) and _hooked(pipe)
    # and again on the offloaded pipeline, then without offload
    with mh.apply(pipe, level=level, **TORCH):
        assert torch.equal(_run(pipe, conds), fused)
        pipe.remove_all_hooks()
        assert not _hooked(pipe)
        assert torch.equal(_run(pipe, conds), fused)
    assert torch.equal(_run(pipe, conds), plain)
    mh.apply(pipe, level=level, **TORCH).remove()  # nothing left claimed or patched


def test_a_foreign_instance_forward_is_still_refused():
    """Only accelerate's hooks (which call ``_old_forward``) are worked around: any other
    wrapper set on the instance is refused by apply, and one set after apply makes remove
    raise until it is undone."""
    pipe = tm.sd_controlnet_pipeline(2)
    multi = pipe.controlnet
    klass = type(multi).forward
    multi.forward = lambda *a, **k: klass(multi, *a, **k)
    with pytest.raises(RuntimeError, match="already has a forward set on the instance"):
        mh.apply(pipe)
    del multi.forward
    multi.forward = multi.forward  # the class forward bound on the instance: harmless
    h = mh.apply(pipe, **TORCH)
    ours = multi.forward
    multi.forward = lambda *a, **k: ours(*a, **k)
    with pytest.raises(RuntimeError, match="replaced after apply"):
        h.remove()
    multi.forward = ours
    h.remove()
    assert "forward" not in multi.__dict__


# --------------------------------------------------------------------- float16 on the CPU


@pytest.mark.parametrize("level", LEVELS)
def test_float16_weights_on_cpu(level):
    """``pipe.to(torch.float16)`` runs on the CPU in diffusers 0.42 / torch 2.13: the nets
    return float16 residuals, fused in float32 statistics and returned as float16; the
    result is close to the float32 fusion and the winners mostly agree. Both runs start from
    the same noise, drawn once in float32: a float16 ``torch.randn`` with the same generator
    draws other numbers on some torch versions (torch 2.11 on CPU, for these latents)."""
    pipe = tm.sd_controlnet_pipeline(2)
    conds = tm.strip_conditions(2, 32)
    side = 32 // pipe.vae_scale_factor
    noise = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=_gen())
    with mh.apply(pipe, level=level, record=True, **TORCH) as h32:
        ref = _run(pipe, conds, latents=noise)
    pipe.to(torch.float16)
    with CombinerCalls(pipe.controlnet) as seen, \
            mh.apply(pipe, level=level, record=True, **TORCH) as h16:
        half = _run(pipe, conds, latents=noise.half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert all(t.dtype == torch.float16 for _, _, out in seen.calls for t in _flat(out))
    assert [r.point for r in h16.records] == [r.point for r in h32.records]
    agree = [float((a.winner == b.winner).float().mean())
             for a, b in zip(h16.records, h32.records)]
    assert min(agree) >= 0.9, agree
    assert float((half.float() - ref).abs().max()) <= 0.1 * float(ref.abs().max())
