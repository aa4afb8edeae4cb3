"""The registered ops, one file each: kernels, launcher, op and public function."""

from .fuse import choose_backend, max_fuse

__all__ = ["choose_backend", "max_fuse"]
