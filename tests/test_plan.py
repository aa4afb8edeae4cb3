"""The work split of a call (``maxfusion_kernels/ops/plan.py``), pure host arithmetic, on the
real shapes of the shape table: no program reads more than 32 KiB of input, so every call has
at least ``input bytes / 32 KiB`` programs in its widest launch; the programs of a launch read
about the same bytes; tiles depend on nothing but N, the dtype and the layout (so a group's
result does not depend on the batch or on the other groups); the scratch memory bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from maxfusion_kernels.ops import plan as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import load_shapes  # noqa: E402

CASES = load_shapes()["cases"]
ELEM = {"float16": 2, "bfloat16": 2, "float32": 4}


def _input_bytes(shapes, n, elem):
    total = 0
    for s in shapes:
        count = 1
        for v in s:
            count *= v
        total += n * count * elem
    return total


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", list(ELEM))
def test_every_program_reads_at_most_32_kib(case, n, dtype):
    shapes = [tuple(s) for s in CASES[case]["shapes"]]
    elem = ELEM[dtype]
    plan = P.contiguous_plan(shapes, CASES[case]["channel_dim"], n, elem)
    per_program = [plan.program_input_bytes(g) for g in plan.groups]
    assert max(per_program) <= P.MAX_PROGRAM_INPUT_BYTES
    # so the widest launch has at least input bytes / 32 KiB programs
    need = -(-_input_bytes(shapes, n, elem) // P.MAX_PROGRAM_INPUT_BYTES)
    assert max(plan.programs13, plan.programs2) >= need
    # balanced: within a launch no group's programs read less than half of the largest's
    # (the shapes of a pipeline step have channel counts that chunk evenly)
    assert min(per_program) >= max(per_program) / 2, per_program
    # the chunks cover the channels exactly once
    for g in plan.groups:
        assert (g.nch - 1) * g.ch < g.shape.channels <= g.nch * g.ch
        assert g.ch % plan.tiles.block_c == 0


def test_the_issue_figures():
    # issue: >= 320 programs for [2, 320, 64, 64] N = 2 fp16, >= 1640 for the SD1.5 step
    one = P.contiguous_plan([(2, 320, 64, 64)], 1, 2, 2)
    assert one.programs13 >= 320
    step = P.contiguous_plan([tuple(s) for s in CASES["sd15_controlnet_512"]["shapes"]], 1, 2, 2)
    assert step.programs13 >= 1640


@pytest.mark.parametrize("n", [2, 3, 5])
def test_tiles_do_not_depend_on_batch_or_other_groups(n):
    alone = P.contiguous_plan([(1, 640, 32, 32)], 1, n, 2)
    batched = P.contiguous_plan([(4, 640, 32, 32)], 1, n, 2)
    mixed = P.contiguous_plan([(2, 320, 64, 64), (3, 640, 32, 32), (2, 1280, 8, 8)], 1, n, 2)
    assert alone.tiles == batched.tiles == mixed.tiles
    for g in (batched.groups[0], mixed.groups[1]):
        a = alone.groups[0]
        assert (g.nsb, g.nch, g.ch, g.nblk2) == (a.nsb, a.nch, a.ch, a.nblk2)


def test_programs_tile_the_grid_without_gaps():
    plan = P.contiguous_plan([(2, 320, 64, 64), (1, 1536, 300), (3, 8, 5)], -1 % 4, 3, 2)
    start13 = start2 = 0
    for g in plan.groups:
        assert (g.start13, g.start2) == (start13, start2)
        start13 += g.shape.batch * g.nch * g.nsb
        start2 += g.shape.batch * g.nblk2
    assert (plan.programs13, plan.programs2) == (start13, start2)


@pytest.mark.parametrize("batch_normalizer", [False, True])
def test_workspace_bound(batch_normalizer):
    """The scratch memory: per site and chunk N means and N (N + 1) / 2 co-moments, per site N
    saliencies and one pair mask, per pass-2 block N partials, per normaliser row N totals and
    one ticket (4 bytes each), each part rounded up to 256 bytes."""
    shapes = [tuple(s) for s in CASES["sd15_controlnet_512"]["shapes"]]
    n = 3
    plan = P.contiguous_plan(shapes, 1, n, 2, batch_normalizer)
    floats = 0
    for g in plan.groups:
        s = g.shape
        rows = 1 if batch_normalizer else s.batch
        floats += s.batch * s.sites * (g.nch * P.stat_width(n) + n + 1)
        floats += s.batch * n * g.nblk2 + rows * (n + 1)
    assert floats * 4 <= plan.workspace_bytes <= floats * 4 + 6 * P.WORKSPACE_ALIGN
    # below 10 % of the input bytes for the SD1.5 step at N = 3 (the statistics' share)
    assert plan.workspace_bytes < 0.1 * _input_bytes(shapes, n, 2)


@pytest.mark.parametrize("elem_bytes", [2, 4, 8])
@pytest.mark.parametrize("n", list(range(2, 9)))
def test_channel_chunks_hold_whole_vectors_when_channels_are_contiguous(n, elem_bytes):
    """With channels contiguous the ALIGNED kernels declare the chunk size CH (and C) multiples
    of the 16-byte vector (``kernels._tile_extent``): every register tile and chunk of the plan
    must then be whole vectors, for every N and element size (C itself is checked per call by
    ``launch.is_aligned``)."""
    vec = 16 // elem_bytes
    tiles = P.pick_tiles(n, elem_bytes, True)
    assert tiles.block_c % vec == 0
    for channels in (vec, 3 * vec, 320, 1280, 3072):
        _, ch = P.channel_chunks(n, channels, elem_bytes, tiles)
        assert ch % vec == 0
