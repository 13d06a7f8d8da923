"""Errors that mean 'the user asked for something wrong': shown as one clear message, no traceback."""


class UserError(Exception):
    """A mistake in a catalog, a dataset or a command line; the message names the file, field or URL."""
