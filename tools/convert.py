#!/usr/bin/env python
"""Entry point of movq.cli.convert.main (see there, or run with --help)."""
import sys

from movq.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
