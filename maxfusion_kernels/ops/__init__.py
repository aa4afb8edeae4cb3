"""The registered ops, one file each: kernels, launcher, op and public function.

``fuse.py``: ``max_fuse`` (one group of N tensors); ``fuse_many.py``: ``max_fuse_many`` (many
groups in the same two launches); ``_fusion_math.py``: the per-tile math both share.
"""

from .fuse import choose_backend, max_fuse
from .fuse_many import max_fuse_many

__all__ = ["choose_backend", "max_fuse", "max_fuse_many"]
