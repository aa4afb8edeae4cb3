"""``maxfusion demo``: run MaxFusion on 2+ ControlNets and show which condition won where.

Offline (the default, nothing is downloaded): a small Stable Diffusion 1.5-style ControlNet
pipeline built from config with random weights (:mod:`.offline_models`), two
ControlNets whose conditioning embeddings are driven by the condition, and two synthetic
conditions that conflict by halves: a depth map (a ramp and a sphere) in the left half and an
edge drawing (a house, a sun) in the right half, each black in the other half.

With real models (``base`` = an SD 1.x/2.x or SDXL pipeline, ``controlnets`` and one condition
image per ControlNet) the same run and figure are made with them.

With ``masks=True`` (``maxfusion demo --masks``) the conditions overlap everywhere (offline:
the depth map and the edge drawing both cover the whole image) and regional masks restrict
each to a region (two conditions: an ellipse with a soft edge and its complement; more: vertical
strips). The pipeline runs twice, without and with the masks, and the figure shows both
runs' winner maps: with the masks each condition wins its own region.

The run records the winner map of every fusion (``maxfusion_hooks.apply(..., record=True)``)
and writes one PNG figure (Pillow only): the conditions, the generated image, and per fusion
point the winner map as a colour overlay, one colour per condition. Diffusers is imported
inside the functions that need it.

Where each part lives: ``config.py`` (options, result, option checks), ``conditions.py`` (the
synthetic conditions and regional masks), ``offline_models.py`` (small models from config with
random weights; the tests build theirs with it too), ``models.py`` (building or loading the
pipeline), ``run.py`` (the run), ``tables.py`` (the numbers and the printed table),
``figure.py`` (the PNG).
"""

from __future__ import annotations

from .conditions import region_masks, synthetic_conditions
from .config import COLOURS, OFFLINE_NOTE, DemoConfig, DemoError, DemoResult, check_options
from .figure import compose_figure
from .run import run_demo
from .tables import (
    format_table,
    half_fractions,
    header,
    is_final_merge,
    region_share,
    winner_density,
)

__all__ = [
    "COLOURS",
    "OFFLINE_NOTE",
    "DemoConfig",
    "DemoError",
    "DemoResult",
    "check_options",
    "compose_figure",
    "format_table",
    "half_fractions",
    "header",
    "is_final_merge",
    "region_masks",
    "region_share",
    "run_demo",
    "synthetic_conditions",
    "winner_density",
]

