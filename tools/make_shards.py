#!/usr/bin/env python
"""Entry point of movq.cli.make_shards.main (see there, or run with --help)."""
import sys

from movq.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
