"""The traffic meter (``benchmarks/analysis/traffic_meter.py``) counts exactly, on tiny hand-written
kernels whose bytes are known, and facts that hold for any correct MaxFusion design hold for
``max_fuse`` (whatever its kernels are: the meter knows none of them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from program_order import walk_grid
from utils import make_features

import maxfusion_kernels as mk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "analysis"))
from traffic_meter import TrafficMeter, scale_sites  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="counts the accesses of the Triton interpreter (TRITON_INTERPRET=1)",
)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)

    @triton.jit
    def _gather_kernel(x_ptr, y_ptr, z_ptr, BLOCK: tl.constexpr):
        """Reads every element of x twice (lanes 2k and 2k+1 read x[k]), every other element
        of y once, and writes z."""
        offs = tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs // 2).to(tl.float32)
        b = tl.load(y_ptr + 2 * offs).to(tl.float32)
        tl.store(z_ptr + offs, a + b)

    @triton.jit
    def _count_kernel(counter_ptr):
        tl.atomic_add(counter_ptr, 1)


def _aligned(*tensors) -> None:  # sector counts below assume 32-byte aligned buffers
    for t in tensors:
        assert t.data_ptr() % 32 == 0


def test_masked_copy_counts_lanes_unique_sectors_and_programs():
    x = torch.arange(100, dtype=torch.float32)
    y = torch.empty_like(x)
    _aligned(x, y)
    with TrafficMeter() as meter:
        _copy_kernel[(4,)](x, y, 100, BLOCK=32)
    rep = meter.report(inputs=[x], outputs=[y])
    assert torch.equal(x, y)
    (la,) = rep.launches
    assert la["kernel"] == "_copy_kernel" and la["grid"] == [4, 1, 1] and la["programs"] == 4
    for scope in (la, rep.call):
        assert scope["loaded"] == scope["unique_loaded"] == 400  # 100 unmasked fp32 lanes
        assert scope["stored"] == scope["unique_stored"] == 400
        assert scope["sector_loaded"] == scope["sector_stored"] == 13 * 32  # 400 B: 13 sectors
        assert scope["classes"]["inputs"]["loaded"] == 400
        assert scope["classes"]["outputs"]["stored"] == 400
        assert scope["classes"]["scratch"] == dict.fromkeys(scope["classes"]["scratch"], 0)
    assert rep.minimum == 800
    assert rep.call["ratios"]["unique"] == 1.0 and rep.call["ratios"]["sector"] == 832 / 800
    progs = rep.programs(0)
    assert [p["grid"] for p in progs] == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert [p["inputs_loaded"] for p in progs] == [128, 128, 128, 16]  # the last is masked
    assert [p["outputs_stored"] for p in progs] == [128, 128, 128, 16]
    assert la["per_program"]["max_input_loaded"] == 128
    assert la["per_program"]["mean_input_loaded"] == 100.0


def test_repeated_and_strided_reads_and_scratch():
    x = torch.arange(32, dtype=torch.float16)  # read twice per element
    y = torch.arange(128, dtype=torch.float16)  # every other element of the first 128 B
    z = torch.empty(64, dtype=torch.float32)
    tmp = torch.empty(64, dtype=torch.float32)  # not named: scratch
    out = torch.empty(64, dtype=torch.float32)
    _aligned(x, y, z, tmp, out)
    with TrafficMeter() as meter:
        _gather_kernel[(1,)](x, y, z, BLOCK=64)
        _copy_kernel[(2,)](z, tmp, 64, BLOCK=32)
        _copy_kernel[(2,)](tmp, out, 64, BLOCK=32)
    rep = meter.report(inputs=[x, y], outputs=[out])
    first = rep.launches[0]
    t = first["tensors"]
    assert t["input 0"]["loaded"] == 128 and t["input 0"]["unique_loaded"] == 64
    assert t["input 0"]["sector_loaded"] == 64
    assert t["input 1"]["loaded"] == 128 and t["input 1"]["unique_loaded"] == 128
    assert t["input 1"]["sector_loaded"] == 256  # 64 lanes, 2 B each, spread over 256 B
    assert first["classes"]["scratch"]["stored"] == 256  # z is not named either
    call = rep.call
    assert call["launches"] == 3 and call["programs"] == 5
    # z and tmp: written once and read once each
    assert call["classes"]["scratch"]["loaded"] == call["classes"]["scratch"]["stored"] == 512
    assert call["classes"]["scratch"]["unique_loaded"] == 512
    assert call["tensors"]["output 0"]["unique_stored"] == 256
    assert rep.minimum == 64 + 256 + 256
    assert call["unique"] == 64 + 128 + 2 * 512 + 256
    assert call["sector"] == 64 + 256 + 2 * 512 + 256


def test_atomics_count_as_load_and_store_and_launches_add_up():
    counter = torch.zeros(1, dtype=torch.int32)
    with TrafficMeter() as meter:
        _count_kernel[(4,)](counter)
        _count_kernel[(2, 3)](counter)
    assert int(counter) == 10
    rep = meter.report(outputs=[counter])
    a, b = rep.launches
    assert (a["programs"], b["programs"], b["grid"]) == (4, 6, [2, 3, 1])
    assert a["loaded"] == a["stored"] == 16 and a["unique_loaded"] == a["unique_stored"] == 4
    assert rep.call["loaded"] == rep.call["stored"] == 40
    assert rep.call["unique"] == 8 and rep.call["sector"] == 64
    assert [p["outputs_stored"] for p in rep.programs(1)] == [4] * 6


def test_meter_restores_the_interpreter_and_composes_with_walk_grid():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    call_before = interpreter.GridExecutor.__dict__["__call__"]
    attrs_before = set(vars(builder))
    x = torch.arange(100, dtype=torch.float32)
    y = torch.empty_like(x)
    with walk_grid("reverse"), TrafficMeter() as meter:
        _copy_kernel[(4,)](x, y, 100, BLOCK=32)
    assert interpreter.GridExecutor.__dict__["__call__"] is call_before
    assert set(vars(builder)) == attrs_before
    assert torch.equal(x, y)
    progs = meter.report(inputs=[x], outputs=[y]).programs(0)
    assert [p["inputs_loaded"] for p in progs] == [128, 128, 128, 16]  # by grid index
    with TrafficMeter() as meter2:  # a fresh meter sees only its own launches
        pass
    assert meter2.launches == [] and len(meter.launches) == 1


def test_scale_sites_keeps_batch_and_channels():
    assert scale_sites([2, 320, 128, 128], 1, 256) == (2, 320, 16, 16)
    assert scale_sites([2, 4096, 1536], -1, 256) == (2, 256, 1536)
    assert scale_sites([2, 320, 16, 64, 64], 1, 256) == (2, 320, 4, 8, 8)
    assert scale_sites([2, 1280, 8, 8], 1, 256) == (2, 1280, 8, 8)
    assert scale_sites([1, 4096, 3072], -1, 256, max_elements=2**18) == (1, 64, 3072)


def test_command_line_writes_the_table_and_records(tmp_path):
    """The CLI on the smallest case of the table (T2I-Adapter maps, --quick: N = 2)."""
    import json

    from traffic_meter import main

    out = tmp_path / "traffic-test"
    assert main(["--quick", "--cases", "sd15_t2i_adapter_512", "--label", "test",
                 "--out", str(out)]) == 0
    records = json.loads(out.with_name("traffic-test.json").read_text())["records"]
    # 4 distinct shapes through max_fuse, one step through max_fuse_many; merge and unmerge
    assert len(records) == 10
    assert {r["op"] for r in records} == {"max_fuse", "max_fuse_many"}
    for r in records:
        assert r["report"]["call"]["tensors"]["input 0"]["stored"] == 0
        assert r["report"]["call"]["ratios"]["unique"] >= 1.0
    text = out.with_name("traffic-test.md").read_text()
    assert text.count("| max_fuse") == 10


@pytest.mark.parametrize("n, unmerge, info", [(2, False, False), (3, True, True)])
def test_max_fuse_reads_each_input_once_and_writes_each_output(n, unmerge, info):
    """Structural facts of any correct design, whatever its launches: every input byte is
    read, none is written, every output (and info) byte is written."""
    feats = make_features([2, 8, 16, 16], n, dtype=torch.float16)
    with TrafficMeter() as meter:
        res = mk.max_fuse(feats, unmerge=unmerge, return_info=info, backend="triton")
    result, fi = res if info else (res, None)
    outputs = (list(result) if unmerge else [result])
    if fi is not None:
        outputs += [fi.winner, fi.members]
    rep = meter.report(inputs=feats, outputs=outputs)
    x_bytes = feats[0].numel() * feats[0].element_size()
    assert rep.launches and all(la["programs"] > 0 for la in rep.launches)
    call = rep.call
    for k in range(n):
        t = call["tensors"][f"input {k}"]
        assert t["unique_loaded"] == x_bytes and t["stored"] == 0
    for k, o in enumerate(outputs):
        t = call["tensors"][f"output {k}"]
        assert t["unique_stored"] == o.numel() * o.element_size()
    assert call["classes"]["inputs"]["unique_loaded"] == n * x_bytes
    assert call["unique"] >= rep.minimum
    assert rep.minimum == n * x_bytes + sum(o.numel() * o.element_size() for o in outputs)
