#!/usr/bin/env python
"""Entry point of movq.cli.tokenize.main (see there, or run with --help)."""
import sys

from movq.cli.tokenize import main

if __name__ == "__main__":
    sys.exit(main())
