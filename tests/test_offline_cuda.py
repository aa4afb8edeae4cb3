"""The host-side tools of ``benchmarks/analysis/offline_cuda.py``: the occupancy calculator against
hand-computed cases, and the parsers of ``ptxas -v`` logs and PTX global accesses. Pure host
arithmetic and text: no compilation, no GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "analysis"))

import offline_cuda as oc  # noqa: E402


# Each case worked by hand with the model of NVIDIA's cuda_occupancy.h: registers per warp =
# regs * 32 rounded up to 256; a quarter of the 64 Ki register file per sub-partition; warps
# per SM = 4 * floor(16384 / regs per warp); shared memory per CTA = use + 1 KiB, rounded up
# to 128 B.
@pytest.mark.parametrize("arch, regs, warps, smem, ctas, limiter", [
    # 56 * 32 = 1792 (7 units); 16384 // 1792 = 9 warps per sub-partition -> 36 warps -> 9 CTAs
    (90, 56, 4, 2048, 9, "registers"),
    # 46 * 32 = 1472 -> 1536; 16384 // 1536 = 10 -> 40 warps -> 10 CTAs
    (90, 46, 4, 0, 10, "registers"),
    # 32 regs: 1024 per warp, 64 warps by registers, but 48 warps per SM on sm_86 -> 12 CTAs
    (86, 32, 4, 0, 12, "warps"),
    # one warp of 16 regs: 128 warps by registers, 48 by warps; the 24 CTA slots bind first
    (89, 16, 1, 0, 24, "CTA slots"),
    # 50 KiB + 1 KiB reserved = 52224 B; 164 KiB // 52224 = 3
    (80, 32, 4, 50 * 1024, 3, "shared memory"),
    # 255 regs -> 8192 per warp (the hardware check: 8192 * 8 warps = 64 Ki fits): 1 CTA
    (90, 255, 8, 0, 1, "registers"),
    # 255 regs with 16 warps: 8192 * 16 > 64 Ki registers, the launch cannot happen at all
    (90, 255, 16, 0, 0, "registers"),
    # more shared memory than a CTA may opt in to (228 KiB - 1 KiB): 0
    (90, 32, 4, 228 * 1024, 0, "shared memory"),
    # 64 regs, 4 warps on sm_120: 2048 per warp, 8 per sub-partition -> 32 warps -> 8 CTAs
    (120, 64, 4, 0, 8, "registers"),
    # sm_86 and sm_80 differ only in the warp slots: 40 regs, 8 warps -> 1280 per warp,
    # 12 warps per sub-partition -> 48 warps -> 6 CTAs on both, registers and (sm_86) warps
    (86, 40, 8, 0, 6, "warps+registers"),
    (80, 40, 8, 0, 6, "registers"),
])
def test_occupancy_hand_computed(arch, regs, warps, smem, ctas, limiter):
    occ = oc.occupancy(arch, regs, warps, smem)
    assert (occ.ctas_per_sm, occ.limiter) == (ctas, limiter), occ
    assert occ.warps_per_sm == ctas * warps


def test_occupancy_fraction():
    occ = oc.occupancy(90, 56, 4, 2048)
    assert occ.occupancy == pytest.approx(36 / 64)
    assert occ.by_limit == {"warps": 16, "CTA slots": 32, "registers": 9, "shared memory": 76}


def test_arch_table_is_consistent():
    for arch, lim in oc.ARCHS.items():
        assert lim.arch == arch
        assert lim.max_warps_per_sm in (48, 64)
        assert lim.smem_per_cta_max == lim.smem_per_sm - 1024
    assert set(oc.DEFAULT_ARCHS) <= set(oc.ARCHS)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_stats_kernel' for 'sm_90a'
ptxas info    : Function properties for _stats_kernel
    16 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 32 bytes smem, 628 bytes cmem[0]
"""


def test_parse_ptxas_log():
    assert oc.parse_ptxas_log(PTXAS_LOG) == {
        "registers": 80, "stack_frame": 16, "spill_stores": 16, "spill_loads": 8,
        "static_shared": 32, "cmem0": 628,
    }
    with pytest.raises(ValueError):
        oc.parse_ptxas_log("ptxas fatal : nothing")


# A made-up kernel: a 16-byte and a 2-byte fp16 load (the second inlined from a helper: its
# TTGIR location is a call site), an 8-byte fp32 store whose PTX column differs from the TTGIR
# op's (matched by its line), a 1-byte i8 store, and a load with no TTGIR op at its position.
PTX = """\
	.loc	1 10 5
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	.loc	2 20 13, function_name $L__info_string0, inlined_at 1 11 3
	@%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
	.loc	1 30 7
	st.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };  // a comment: ld.global.b8
	.loc	1 31 9
	st.global.b8 [ %rd4 + 0 ], %rs2;
	.loc	1 40 1
	ld.global.nc.L1::evict_last.b64 %rd5, [ %rd6 ];
	.file	1 "/src/k.py"
	.file	2 "/src/helpers.py"
"""
TTGIR = """\
    %a = tt.load %p, %m : tensor<2x128x!tt.ptr<f16>, #blocked> loc(#loc3)
    %b = tt.load %q : tensor<8x!tt.ptr<f16>, #blocked1> loc(#loc5)
    tt.store %r, %v, %m : tensor<128x!tt.ptr<f32>, #blocked> loc(#loc6)
    tt.store %s, %w : tensor<128x!tt.ptr<i8>, #blocked> loc(#loc7)
#loc1 = loc("/src/k.py":10:5)
#loc2 = loc("/src/helpers.py":20:13)
#loc3 = loc("x"(#loc1))
#loc4 = loc("/src/k.py":11:3)
#loc5 = loc(callsite(#loc2 at #loc4))
#loc6 = loc("/src/k.py":30:9)
#loc7 = loc("/src/k.py":31:9)
"""


def test_global_accesses_widths_and_pointees():
    acc = oc.global_accesses(PTX, TTGIR)
    got = [(a.op, a.bytes, a.pointee) for a in acc]
    assert got == [("ld", 16, "f16"), ("ld", 2, "f16"), ("st", 8, "f32"),
                   ("st", 1, "i8"), ("ld", 8, None)]
    assert acc[1].source == ("/src/helpers.py", 20, 13)
    hist = oc.global_access_widths(PTX, TTGIR, pointee="f16")
    assert hist["ld"] == {16: 1, 2: 1} and not hist["st"]
    assert oc.format_widths(hist["ld"]) == "16Bx1 2Bx1"


def test_global_accesses_without_ttgir():
    acc = oc.global_accesses(PTX)
    assert [a.bytes for a in acc] == [16, 2, 8, 1, 8]
    assert all(a.pointee is None for a in acc)
