"""The project's one exception family: errors a user can cause, each saying what to do."""


class CTMRIError(Exception):
    """An error the user can fix. The message says what went wrong and what to do."""


class CancelledError(CTMRIError):
    """The user cancelled a long operation; nothing half-made is left behind."""

    def __init__(self, message: str = "cancelled by the user; no output was written") -> None:
        super().__init__(message)


def shortened(line: str, limit: int) -> str:
    """``line`` cut to ``limit`` characters with an ellipsis: a message quoting a library's long error text."""
    return line if len(line) <= limit else line[: limit - 1] + "…"
