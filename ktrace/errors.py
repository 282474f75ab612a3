"""The few error types that reach the user, each rendered as one line."""

from __future__ import annotations

EXIT_KTRACE_FAILURE = 125


class KtraceError(Exception):
    """A failure of ktrace itself: printed as one line with a hint, exit 125."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_KTRACE_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def render(self) -> str:
        line = f"ktrace: {self.message}"
        if self.hint:
            line += f" (hint: {self.hint})"
        return line
