"""Time one denoising step of SD1.5 with two ControlNets: diffusers' sum against MaxFusion at
residual level, at block level, and at block level with the reference ops instead of the
kernels.

A step is what a ControlNet pipeline runs per denoising step: the ControlNets (through
diffusers' ``MultiControlNetModel``) and then the UNet with their residuals. The models are
built from the SD1.5 configs with random weights (nothing is downloaded); the timing does not
depend on the weights. Usage:

    python benchmarks/pipeline_step.py --device cuda            # full size: fp16, 512 px, B = 2
    python benchmarks/pipeline_step.py --device cpu --tiny      # a smoke run on CPU

It prints a table (ms per step, overhead against the sum) and writes a JSON list of records
(``--out``, default ``benchmarks/results/<device>-sd15-step.json``). The target: block level
adds at most 2 % to the step.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch

# SD1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), as diffusers keywords
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
)


def build(tiny: bool, device, dtype):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    torch.manual_seed(0)
    # on a GPU the models are built there (a full-size UNet's initialisation on the CPU takes
    # tens of seconds; the weights are random either way)
    where = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    with where:
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)).eval()
        nets = [ControlNetModel.from_unet(unet).eval() for _ in range(2)]
    for k, net in enumerate(nets):  # distinct random weights, non-zero zero-convs
        gen = torch.Generator(device=where).manual_seed(k + 1)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, device=where) * 0.02)
    multi = MultiControlNetModel(nets)
    return unet.to(device, dtype), multi.to(device, dtype)


def inputs(tiny: bool, batch: int, device, dtype):
    size = 128 if tiny else 512
    latent = size // 8
    cross = TINY_UNET["cross_attention_dim"] if tiny else 768
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype)
    text = torch.randn(batch, 77, cross, generator=gen).to(device, dtype)
    conds = [torch.rand(batch, 3, size, size, generator=gen).to(device, dtype) for _ in range(2)]
    # two conditions that conflict by halves, so the fusions take both branches
    conds[0][..., size // 2:] = 0
    conds[1][..., : size // 2] = 0
    return sample, text, conds


def step(unet, multi, sample, text, conds):
    down, mid = multi(sample, 500, encoder_hidden_states=text, controlnet_cond=conds,
                      conditioning_scale=[1.0, 1.0], return_dict=False)
    return unet(sample, 500, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]


@contextmanager
def reference_ops():
    """Route the hook layer's fusions through the float32 eager reference (the authors'
    algorithm as docs/spec.md's executable form) instead of the kernels."""
    from maxfusion_hooks import _fusion
    from maxfusion_kernels import reference

    def ref_one(feats, **kw):
        kw.pop("backend", None)
        res = reference.max_fuse(feats, dtype=torch.float32, **kw)
        if kw.get("return_info"):
            res, info = res
        out = [r.to(feats[0].dtype) for r in res] if kw.get("unmerge") else res.to(
            feats[0].dtype)
        return (out, info) if kw.get("return_info") else out

    def ref_many(groups, **kw):
        res = [ref_one(g, **kw) for g in groups]
        if kw.get("return_info"):
            return [r[0] for r in res], [r[1] for r in res]
        return res

    with mock.patch.object(_fusion, "max_fuse", ref_one), \
            mock.patch.object(_fusion, "max_fuse_many", ref_many):
        yield


def time_step(fn, device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small models (a CPU smoke run)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import maxfusion_hooks as mh

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet, multi = build(args.tiny, device, dtype)
    sample, text, conds = inputs(args.tiny, args.batch, device, dtype)
    run = lambda: step(unet, multi, sample, text, conds)  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or "cpu")
    methods = [
        ("sum", nullcontext, {}),
        ("residual", None, dict(level="residual")),
        ("block", None, dict(level="block")),
        ("block_reference_ops", reference_ops, dict(level="block")),
    ]
    records = []
    base = None
    with torch.inference_mode():
        for method, ctx, apply_kw in methods:
            handle = mh.apply(multi, **apply_kw) if apply_kw else nullcontext()
            with handle, (ctx() if ctx else nullcontext()):
                times = time_step(run, device, args.warmup, args.reps)
            ms = statistics.median(times)
            base = ms if method == "sum" else base
            records.append(dict(device=name, case="sd15_step_2_controlnets", method=method,
                                tiny=args.tiny, batch=args.batch, dtype=str(dtype), ms=ms,
                                ms_min=min(times), overhead_vs_sum=ms / base - 1,
                                torch=torch.__version__, reps=args.reps))
    print(f"SD1.5 step with 2 ControlNets on {name} ({'tiny models' if args.tiny else '512 px'},"
          f" B={args.batch}, {dtype}):")
    print(f"{'method':>22} {'ms':>9} {'vs sum':>8}")
    for r in records:
        print(f"{r['method']:>22} {r['ms']:9.3f} {100 * r['overhead_vs_sum']:+7.1f}%")
    block = next(r for r in records if r["method"] == "block")
    verdict = "PASS" if block["overhead_vs_sum"] <= 0.02 else "MISS"
    if args.tiny or device.type != "cuda":
        verdict = "not evaluated (a full-size GPU run decides it)"
    print(f"TARGET block level adds <= 2 % to the step: {verdict}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"
    out = Path(args.out or f"benchmarks/results/{slug}-sd15-step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
