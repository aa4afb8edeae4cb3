"""The registered ops and the kernels behind them.

``fuse.py``: ``max_fuse`` (one group of N tensors); ``fuse_many.py``: ``max_fuse_many`` (many
groups in the same three launches). Both run ``launch.py``, which launches the three Triton
kernels of ``kernels.py`` with the work split that ``plan.py`` computes (pure host arithmetic).
"""

from . import autograd as _autograd  # noqa: F401  (registers the backward of both ops)
from .fuse import choose_backend, max_fuse
from .fuse_many import max_fuse_many

__all__ = ["choose_backend", "max_fuse", "max_fuse_many"]
