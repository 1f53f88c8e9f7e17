"""What the CLI writes reaches a terminal as text, never as control sequences.

Node, input and file names come from model files; printed raw, a name holding ``ESC [2J`` clears
the user's screen and ``ESC ]0;`` retitles the window. The CLI wraps stdout and stderr once, so
that every line it prints, tables and log lines included, shows such characters as escapes
(``\\x1b``). Newlines, tabs and the carriage return a progress bar redraws with pass through.
"""

from __future__ import annotations

from typing import Any, TextIO

from detc.compiler.errors import escape_control

_LAYOUT = "\n\r\t"


class TerminalSafeStream:
    """A text stream that escapes control characters in what is written, delegating the rest."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(escape_control(text, keep=_LAYOUT))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def make_terminal_safe(stream: TextIO) -> TextIO:
    """``stream`` wrapped (once) in a :class:`TerminalSafeStream`."""
    if isinstance(stream, TerminalSafeStream):
        return stream
    return TerminalSafeStream(stream)  # type: ignore[return-value]
