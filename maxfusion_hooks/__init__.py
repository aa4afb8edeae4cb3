"""maxfusion_hooks: apply MaxFusion inside diffusers pipelines and raw PyTorch control models.

The hook layer builds on :mod:`maxfusion_kernels` (never the other way round). Its residual
and block-level patches are being built (see the project's issues); for now it re-exports the
kernel entry point so that ``import maxfusion_hooks`` works without diffusers installed.
"""

from maxfusion_kernels import max_fuse

__all__ = ["max_fuse"]
