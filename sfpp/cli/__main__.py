"""python -m sfpp.cli: the `sfpp` command."""

import sys

from sfpp.cli import main

sys.exit(main())
