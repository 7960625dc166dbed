"""python -m bench [e2e | chunk_step] [options]: the suite (default) or the single chunk-step timing."""

import sys

from bench import chunk_step
from sfpp.benchmark import e2e

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] == "chunk_step":
        chunk_step.main(argv[1:])
    else:
        sys.exit(e2e.main(argv[1:] if argv and argv[0] == "e2e" else argv))
