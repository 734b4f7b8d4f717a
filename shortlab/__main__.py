"""``python -m shortlab <command>``: see ``shortlab.cli``."""

import sys

from shortlab.cli import main

sys.exit(main())
