"""The terminal: text layout (display widths, where CJK characters take two columns; two columns side
by side), and output that outlives the program reading it."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import unicodedata


def side_by_side(left: str, right: str, width: int, titles=("base", "tuned")) -> str:
    """Two columns of wrapped text; CJK characters count as two columns wide."""
    column = max((width - 3) // 2, 10)
    rows_left = [titles[0], "-" * column, *_wrap(left, column)]
    rows_right = [titles[1], "-" * column, *_wrap(right, column)]
    rows = max(len(rows_left), len(rows_right))
    rows_left += [""] * (rows - len(rows_left))
    rows_right += [""] * (rows - len(rows_right))
    return "\n".join(f"{_pad(a, column)} | {b}".rstrip() for a, b in zip(rows_left, rows_right))


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for ch in paragraph:
            if display_width(line + ch) > width:
                lines.append(line)
                line = ""
            line += ch
        lines.append(line)
    return lines


def terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 100


class OutlivesReader:
    """A text stream whose writes go on, into nothing, once the program reading it is gone.

    `roletune train ... 2>&1 | tee log` and Ctrl-C: the signal stops tee too, and every later write to the
    pipe raises BrokenPipeError, from the signal's own message, a log line or a progress bar, in the middle
    of saving the checkpoint the signal asked for. Here the first such write sends the stream to
    /dev/null instead (Python's flush at exit included) and the work goes on.
    """

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self._gone = True
        with contextlib.suppress(OSError, ValueError):  # a stream without a file descriptor (a test's capture)
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def __getattr__(self, name):  # encoding, isatty, fileno, ... as the stream has them
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_outlives_reader():
    """sys.stdout and sys.stderr as OutlivesReader streams, for the duration of a command."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = OutlivesReader(sys.stdout), OutlivesReader(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
