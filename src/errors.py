"""The one error type users see: bad input, reported by every entry point as one line (no traceback), exit 2."""


class UserInputError(Exception):
    """Bad input from the user: a flag, a file, a combination. The message names it and the fix."""


class StopsTraining(UserInputError):
    """Bad input that shows only once training runs (a sample whose every target the masks mask): train.py saves what
    it trained so far before it reports it (src/train/stopping.py StopOnSignal), and says so in the same line."""

    def add(self, note: str) -> None:
        """Append `note` to the message."""
        self.args = (f"{self.args[0]}; {note}",)
