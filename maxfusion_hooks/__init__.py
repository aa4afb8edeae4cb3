"""maxfusion_hooks: MaxFusion inside diffusers pipelines and raw PyTorch control models.

``apply(target, level="residual" | "block", record=False, masks=None, process_group=None,
**max_fuse_options)``
patches a diffusers pipeline, a multi-condition combiner (``MultiControlNetModel``,
``MultiControlNetUnionModel``, ``SD3MultiControlNetModel``, ``FluxMultiControlNetModel``,
``QwenImageMultiControlNetModel``, ``HunyuanDiT2DMultiControlNetModel``, ``MultiAdapter``) or
a list of control models, and returns a handle whose ``remove()`` (or
with-block) undoes every patch and whose ``set_masks`` changes the regional masks (one
image-space mask per control model) between calls. Under diffusers' context parallelism a
Flux or QwenImage pipeline's fused residuals are cut to each rank's tokens; ``process_group`` is for
residuals that are themselves sharded. See docs/integration.md.

Importing this package imports neither diffusers nor greenlet and initialises no CUDA context;
the handlers match diffusers classes by name and import nothing.
"""

from maxfusion_kernels import max_fuse

from ._api import AlreadyAppliedError, MaxFusionHandle, apply
from ._fusion import FusionSettings, Record, fuse_residual_groups
from ._lockstep import FusionPoint, LockstepError

__all__ = [
    "AlreadyAppliedError",
    "FusionPoint",
    "FusionSettings",
    "LockstepError",
    "MaxFusionHandle",
    "Record",
    "apply",
    "fuse_residual_groups",
    "max_fuse",
]
