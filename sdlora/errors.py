"""The one exception type for errors a user can cause: a one-line message and a hint."""


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
