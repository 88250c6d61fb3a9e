#!/usr/bin/env python
"""Entry point of movq.cli.check_conditions.main (see there, or run with --help)."""
import sys

from movq.cli.check_conditions import main

if __name__ == "__main__":
    sys.exit(main())
