"""The two kinds of failure the scripts report to the user in one line."""


class InputError(Exception):
    """Bad user input (file, row, field). The message is one line that names all three where known."""


def check_choice(flag: str, value: str, choices: tuple) -> None:
    """A flag that takes one of a few names: anything else is one clear line."""
    if value not in choices:
        raise InputError(f"--{flag} must be one of {', '.join(choices)}, not {value!r}")


class ModelCallError(Exception):
    """A model call failed after all retries. The message never contains secrets."""
