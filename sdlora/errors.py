"""The one exception type for errors a user can cause: a one-line message and a hint; and the first line of any other
error, to quote inside one."""


class UserError(Exception):
    """A problem with the user's input (a file, a setting, a model) that they can fix.

    The CLI prints it as one line and exits with code 2; the app shows it and keeps running.
    """

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to `limit` characters: what a
    UserError quotes of the library error behind it."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
