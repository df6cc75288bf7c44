"""The candidates file of ``rankserve rank``: one text per line, read with errors a user can act on."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import BinaryIO

from rankserve.errors import UsageError

ECHO_CHARS = 80
"""``rankserve rank`` shows at most this many characters of a candidate."""


@dataclass(frozen=True)
class Candidate:
    line: int  # 1-based line number in the file: the candidate's id in the results
    text: str


def _read_bytes(path: str, stdin: BinaryIO | None) -> bytes:
    if path == "-":
        return (stdin or sys.stdin.buffer).read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"--texts-file {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--texts-file {path}: is a directory, not a file of texts (one per line)") from None
    except PermissionError:
        raise UsageError(f"--texts-file {path}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"--texts-file {path}: cannot read it ({exc.strerror or exc})") from None


def decode_lines(data: bytes, name: str) -> list[Candidate]:
    """The non-blank lines of ``data`` (UTF-8, a leading byte-order mark allowed), stripped, numbered as
    in the file (blank lines are skipped but counted)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UsageError(f"--texts-file {name}: not UTF-8 at byte {exc.start} (line {line}, byte {column} of it): "
                          f"save it as UTF-8") from None
    lines = [Candidate(number, line.strip()) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise UsageError(f"--texts-file {name}: no candidate texts in it (one per line; blank lines are skipped)")
    return lines


def read_candidates(path: str, stdin: BinaryIO | None = None) -> list[Candidate]:
    """Candidates of ``path`` (``-``: standard input), see :func:`decode_lines`."""
    return decode_lines(_read_bytes(path, stdin), "(standard input)" if path == "-" else path)


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` if at most ``limit`` characters, else its first ``limit`` and how long it is."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} chars)"
