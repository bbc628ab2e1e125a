"""`python -m ratelimitd ...` runs the command line, as the `ratelimitd` script does."""

import sys

from ratelimitd.cli import main

sys.exit(main())
