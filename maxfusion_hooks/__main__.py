"""``python -m maxfusion_hooks``: the ``maxfusion`` command (see ``maxfusion_hooks.cli``)."""

from .cli import main

raise SystemExit(main())
