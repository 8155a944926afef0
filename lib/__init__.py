"""Shared pieces of the two models: data, quantization, layers, the training loop."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file). Scripts print it as one line and exit with status 2."""
