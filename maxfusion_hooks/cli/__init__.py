"""The ``maxfusion`` command: ``commands.py`` parses the arguments and runs ``demo``, ``info`` or
``bench``; ``demo/`` is the demo (its models, the run, its tables and its figure).

Not part of the hook layer: it uses ``maxfusion_hooks.apply`` as any user would.
"""

from .commands import BENCH_SCRIPT, backend_report, build_parser, main

__all__ = ["BENCH_SCRIPT", "backend_report", "build_parser", "main"]
