"""``python -m fxpass``: the ``fxpass`` command line (fxpass.cli)."""

from fxpass.cli import main

raise SystemExit(main())
