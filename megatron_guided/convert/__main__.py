"""`python -m megatron_guided.convert hf-to-mcore|mcore-to-hf ...` (see :mod:`megatron_guided.convert.cli`)."""

import sys

from megatron_guided.convert.cli import main

if __name__ == "__main__":  # dist_checkpointing and the --verify ranks start processes that re-import __main__
    sys.exit(main())
