#!/usr/bin/env python
"""Entry point of movq.cli.judge.main (see there, or run with --help)."""
import sys

from movq.cli.judge import main

if __name__ == "__main__":
    sys.exit(main())
