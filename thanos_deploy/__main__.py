"""`python -m thanos_deploy ...` runs the command line (torchrun and other launchers start modules)."""

import sys

from .cli import main

sys.exit(main())
