"""`python -m ratelimitd` runs the command line."""

import sys

from ratelimitd.cli.main import main

sys.exit(main())
