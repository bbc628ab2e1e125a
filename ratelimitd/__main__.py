"""`python -m ratelimitd` runs the command line."""

import sys

from ratelimitd.cli import main

sys.exit(main())
