#!/usr/bin/env python
"""Entry point of movq.cli.clip_guide.main (see there, or run with --help)."""
import sys

from movq.cli.clip_guide import main

if __name__ == "__main__":
    sys.exit(main())
