"""`python -m lmforge ...` runs the command line, e.g. under `torchrun ... -m lmforge train CONFIG`."""

import sys

from lmforge.cli import main

sys.exit(main())
