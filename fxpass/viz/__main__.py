import sys

from fxpass.viz.cli import main

sys.exit(main())
