"""The one exception users see as a single line: `error: <what> (<where>): <how to fix>`."""

import difflib


class UsageError(Exception):
    """Bad input from the user. The CLI prints it as one line and exits 2 — no traceback."""

    def __init__(self, what: str, where: str = "", fix: str = ""):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        where = f" ({self.where})" if self.where else ""
        fix = f": {self.fix}" if self.fix else ""
        return f"error: {self.what}{where}{fix}"


def did_you_mean(word: str, choices, otherwise: str | None = None, cutoff: float = 0.6) -> str:
    """"did you mean 'X'?" when a close spelling exists; else `otherwise`, or the list of valid choices."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    if close:
        return f"did you mean '{close[0]}'?"
    return otherwise if otherwise is not None else "choose one of: " + ", ".join(choices)
