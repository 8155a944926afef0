"""Shared pieces of the two models: data, quantization, layers, the training loop."""
import argparse
import sys


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file). Scripts print it as one line and exit with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage) and exit status 2."""

    def __init__(self, **kw):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
