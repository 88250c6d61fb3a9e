#!/usr/bin/env python
"""Entry point of movq.cli.train.main_tokenizer (see there, or run with --help)."""
import sys

from movq.cli.train import main_tokenizer

if __name__ == "__main__":
    sys.exit(main_tokenizer())
