"""``python -m aiolm``: the ``aiolm`` command."""

from .cli import main

raise SystemExit(main())
