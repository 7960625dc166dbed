"""`python -m sfpp ...` is the `sfpp` command (what torchrun runs: torchrun --nproc_per_node N -m sfpp generate ...)."""

import sys

from sfpp.cli import main

if __name__ == "__main__":
    sys.exit(main())
