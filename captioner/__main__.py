"""`python -m captioner ...`: the same as the `captioner` command."""

import sys

from .cli import main

sys.exit(main())
