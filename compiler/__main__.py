"""`python -m slimc` (and `torchrun ... -m slimc`) runs the command line."""

import sys

from slimc.commands.cli import main

sys.exit(main())
