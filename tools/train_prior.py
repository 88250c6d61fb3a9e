#!/usr/bin/env python
"""Entry point of movq.cli.train.main_prior (see there, or run with --help)."""
import sys

from movq.cli.train import main_prior

if __name__ == "__main__":
    sys.exit(main_prior())
