"""A screenplay's or a novel's text, and the encoding it was found in.

UTF-8 is tried first, strictly: it is the common case, and a file that decodes as UTF-8 is UTF-8. Anything
else is charset-normalizer's best reading among the encodings books and scripts come in (CANDIDATES), and
the report names it, so a wrong guess is seen before a dataset is trained on. Left free to choose among all
its codecs, it reads a few lines of GB18030 as EUC-KR or Thai; and on a file of a sentence or two it finds
nothing, where GB18030, the legacy encoding of Chinese text, is tried last.
"""
from __future__ import annotations

import codecs
import unicodedata
from pathlib import Path

from roletune.errors import DataError

TEXT_WHITESPACE = {"\t", "\n", "\r", "\f", "\v"}
# GB2312 and GBK are subsets of GB18030: a file read as either is read as GB18030, which also holds the
# characters they lack.
SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030", "hz": "gb18030"}
CANDIDATES = ["gb18030", "big5", "utf_16", "utf_32", "shift_jis", "euc_kr", "cp1252"]
DISPLAY = {"utf_8": "UTF-8", "gb18030": "GB18030", "big5": "Big5", "big5hkscs": "Big5-HKSCS", "utf_16": "UTF-16",
           "utf_16_le": "UTF-16 LE", "utf_16_be": "UTF-16 BE", "shift_jis": "Shift JIS", "cp932": "Shift JIS",
           "euc_jp": "EUC-JP", "euc_kr": "EUC-KR", "cp949": "EUC-KR", "cp1252": "Windows-1252",
           "latin_1": "Latin-1"}


def read_text(path: Path, kind: str = "text") -> tuple[str, str]:
    """The file's text and the name of the encoding it was read in; `kind` names the file in errors."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; give {kind} files") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        text = data.decode("utf-8-sig")
        encoding = "UTF-8 with BOM" if data.startswith(codecs.BOM_UTF8) else "UTF-8"
    except UnicodeDecodeError as exc:
        text, encoding = _detected(data, path, exc.start)
    junk = _junk_at(text)
    if junk is not None:
        where = (f"byte {len(text[:junk].encode('utf-8')) + (3 if encoding == 'UTF-8 with BOM' else 0)}"
                 if encoding.startswith("UTF-8") else f"character {junk} (read as {encoding})")
        raise DataError(f"{path}: not text: control character at {where}")
    return text, encoding


def _detected(data: bytes, path: Path, utf8_stop: int) -> tuple[str, str]:
    from charset_normalizer import from_bytes

    best = from_bytes(data, cp_isolation=CANDIDATES).best()
    codec = SUPERSETS.get(best.encoding, best.encoding) if best else "gb18030"
    try:
        text = data.decode(codec).removeprefix("\ufeff")
    except UnicodeDecodeError:
        text = None
    if text is None or (best is None and _junk_at(text) is not None):
        raise DataError(f"{path}: not text: not UTF-8 (byte {utf8_stop}), and no other encoding reads it; "
                        "save it as UTF-8")
    return text, DISPLAY.get(codec, codec)


def _junk_at(text: str) -> int | None:
    """Where the text holds something no book or script does (control, private-use or replacement characters)."""
    for index, char in enumerate(text):
        if char == "\ufffd" or (unicodedata.category(char) in ("Cc", "Co") and char not in TEXT_WHITESPACE):
            return index
    return None
