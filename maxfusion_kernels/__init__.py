"""maxfusion_kernels: fused Triton kernels for MaxFusion (ECCV 2024).

``max_fuse(features, ...)`` fuses N same-shape feature maps of N control models: average where
they agree, keep the most expressive input where they do not (docs/spec.md). Importing this package
initialises no CUDA context and imports no diffusers.
"""

from . import reference
from .ops import choose_backend, max_fuse, max_fuse_many
from .options import MAX_INPUTS, PRESETS, FuseInfo

__version__ = "0.1.0"

__all__ = [
    "MAX_INPUTS",
    "PRESETS",
    "FuseInfo",
    "choose_backend",
    "max_fuse",
    "max_fuse_many",
    "reference",
    "__version__",
]
