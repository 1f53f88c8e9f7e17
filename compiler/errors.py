"""One exception hierarchy; each class carries the process exit code the CLI returns for it.

Exit codes (documented in README "Exit codes"):
    0 ok · 1 check failed (accuracy / latency gate) · 2 bad input, usage or unsupported model ·
    3 verification mismatch · 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MISMATCH = 3
EXIT_INTERRUPTED = 130


class DetcError(Exception):
    """Base of every error detc reports to a user: a one-line message (what, where, what to do)."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(DetcError):
    """A file, option or model detc cannot accept (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(BadInputError):
    """A well-formed model that uses something detc does not support (exit 2)."""


class ToolchainMissingError(BadInputError):
    """An external tool (cross compiler, emulator) is not installed (exit 2)."""


class CheckFailedError(DetcError):
    """An accuracy or latency gate the user asked for did not hold (exit 1)."""

    exit_code = EXIT_CHECK_FAILED


class VerificationMismatchError(DetcError):
    """A compiled artifact disagrees with its reference beyond tolerance (exit 3)."""

    exit_code = EXIT_MISMATCH


class PassError(DetcError):
    """A pass crashed; the message says where the reproducer was written (exit 2)."""

    exit_code = EXIT_BAD_INPUT


#: characters a terminal acts on rather than prints: C0 and C1 controls (ESC starts colour,
#: clear-screen and window-title sequences), DEL, and the bidirectional overrides that reorder
#: what a reader sees
_UNPRINTABLE = frozenset(
    [*map(chr, range(0x00, 0x20)), "\x7f", *map(chr, range(0x80, 0xA0))]
    + [chr(c) for c in (0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))]
)


def escape_control(text: str, *, keep: str = "") -> str:
    """``text`` with every terminal control character shown as an escape (``\\x1b``, ``\\u202e``).

    Model files name nodes, inputs and files; whatever detc prints of them passes through here so
    that a name cannot clear the screen or retitle the window. ``keep`` lists controls to pass
    through (a multi-line report keeps ``"\\n"``).
    """
    if not any(ch in _UNPRINTABLE for ch in text):
        return text
    return "".join(
        ch if ch in keep or ch not in _UNPRINTABLE else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
