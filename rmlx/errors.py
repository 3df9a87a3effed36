"""The one error type for bad input (a file, a key, a shape, a value). The CLI maps it to exit 2."""


class InputError(ValueError):
    """Bad user input: the message names the file, key, shape or value that is wrong."""
