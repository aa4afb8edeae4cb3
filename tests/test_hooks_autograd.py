"""The hooks under autograd: a loss on the UNet output of a tiny SD 1.5 pipeline with two
ControlNets, differentiated back to both condition images, at residual and block level (the
greenlet lockstep included), on the torch path and the Triton kernels (interpreter)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from tiny_models import single_thread_fixture

import maxfusion_hooks as mh

single_thread = pytest.fixture(scope="module", autouse=True)(single_thread_fixture)


@pytest.fixture(scope="module")
def pipe():
    return tm.sd_controlnet_pipeline(2)


def _grads(pipe, level, backend, fuse=True):
    conds = [c.clone().requires_grad_() for c in tm.strip_conditions(2, 32, batch=1)]
    inp = tm.unet_inputs(batch=1)
    with torch.enable_grad():  # diffusers' pipeline __call__ runs under no_grad: the parts
        if fuse:
            with mh.apply(pipe.controlnet, level=level, backend=backend):
                down, mid = pipe.controlnet(**inp, controlnet_cond=conds,
                                            conditioning_scale=[1.0, 0.8], return_dict=False)
        else:
            down, mid = pipe.controlnet(**inp, controlnet_cond=conds,
                                        conditioning_scale=[1.0, 0.8], return_dict=False)
        noise = pipe.unet(**inp, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)[0]
        loss = (noise.float() ** 2).mean()
        return torch.autograd.grad(loss, conds)


@pytest.mark.parametrize("level,backend", [("residual", "torch"), ("block", "torch"),
                                           ("residual", "triton"), ("block", "triton")])
def test_condition_images_get_gradients(pipe, level, backend):
    grads = _grads(pipe, level, backend)
    summed = _grads(pipe, level, backend, fuse=False)  # diffusers' sum of the residuals
    for k, (g, s) in enumerate(zip(grads, summed)):
        assert bool(g.isfinite().all()), f"condition {k}: non-finite gradient"
        assert float(g.abs().sum()) > 0, f"condition {k}: zero gradient"
        # MaxFusion's gradient is its own, not the sum's
        assert not torch.allclose(g, s), f"condition {k}: the gradient of the plain sum"
    # each condition drives its own half of the image (strip conditions): the gradient of
    # condition k is largest inside its strip, where its net wins the fusion
    for k, g in enumerate(grads):
        own = g[..., k * 16:(k + 1) * 16].abs().sum()
        other = g[..., (1 - k) * 16:(2 - k) * 16].abs().sum()
        assert float(own) > float(other), f"condition {k}: {float(own)} <= {float(other)}"


def test_graph_only_under_grad_and_bitwise_equal(pipe):
    """Block level: with grad (the nets' parameters require it) every residual has a graph;
    under no_grad none has; the values are bitwise the same."""
    conds = tm.strip_conditions(2, 32, batch=1)
    inp = tm.unet_inputs(batch=1)
    assert any(p.requires_grad for p in pipe.controlnet.parameters())
    outs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), mh.apply(pipe.controlnet, level="block",
                                                     backend="torch"):
            down, mid = pipe.controlnet(**inp, controlnet_cond=conds,
                                        conditioning_scale=[1.0, 0.8], return_dict=False)
        assert all((r.grad_fn is not None) == grad for r in [*down, mid])
        outs.append([r.detach() for r in [*down, mid]])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
