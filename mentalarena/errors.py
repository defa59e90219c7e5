"""The two kinds of failure the scripts report to the user in one line."""


class InputError(Exception):
    """Bad user input (file, row, field). The message is one line that names all three where known."""


class ModelCallError(Exception):
    """A model call failed after all retries. The message never contains secrets."""
