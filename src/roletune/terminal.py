"""Text layout for the terminal: display widths (CJK characters take two columns), two columns."""
from __future__ import annotations

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
