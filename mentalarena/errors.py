"""The kinds of failure the scripts report to the user in one line."""


class InputError(Exception):
    """Bad user input (file, row, field). The message is one line that names all three where known."""


class EndpointError(InputError):
    """A server named on the command line cannot be used (unreachable, key refused, model unknown),
    found before any work starts. The message names the server, never its credentials."""


class BusyError(InputError):
    """Another live run is writing the same output."""


def check_choice(flag: str, value: str, choices: tuple) -> None:
    """A flag that takes one of a few names: anything else is one clear line."""
    if value not in choices:
        raise InputError(f"--{flag} must be one of {', '.join(choices)}, not {value!r}")


class StorageError(Exception):
    """An output could not be written (a full disk, a quota, a file too large for the file system, a
    symbolic link where an output goes). The message is one line naming the file; whatever was
    written before is left whole, so a re-run resumes from it."""


class ModelCallError(Exception):
    """A model call failed after all retries. The message never contains secrets."""


class ServiceRefused(ModelCallError):
    """The service refused the run in a way no retry can fix (a key refused or without credit, a
    model not found, a request the server calls invalid): the run stops at once, with one line."""


class ContextOverflow(ModelCallError):
    """The server refused a prompt longer than its context window. `prompt_tokens` and `window`
    are the server's own counts where it gave them (llama.cpp does), else None."""

    def __init__(self, message: str, prompt_tokens: int | None = None, window: int | None = None):
        super().__init__(message)
        self.prompt_tokens, self.window = prompt_tokens, window
