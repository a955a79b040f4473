"""``python -m nesc.cli``: the same command line as the installed ``nesc`` script."""

import sys

from nesc.cli import main

sys.exit(main())
