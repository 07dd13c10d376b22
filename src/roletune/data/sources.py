"""Where records come from: a local JSON/JSONL file, an http(s) URL, or a hub dataset.

Every problem is a DataError that starts with the file (or URL, or dataset id) and, where
there is one, the line or record.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from roletune.errors import DataError

URL_TIMEOUT_S = 60


def read_records(path: str, split: str = "train") -> tuple[str, list]:
    """Return (a name for error messages, the records)."""
    if path.startswith(("http://", "https://")):
        return path, parse_json_file(download(path), name=path)
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir():
            raise DataError(f"{path}: is a folder; give a .json or .jsonl file")
        return str(local), parse_json_file(local, name=str(local))
    if _looks_like_hub_id(path):
        return path, _read_hub_dataset(path, split)
    raise DataError(f"{path}: file not found")


def parse_json_file(path: Path, name: str) -> list:
    """A JSON list of records, or JSON Lines (one record per line)."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{name}: the file is empty")
    if stripped[0] == "[" or (str(name).endswith(".json") and not _is_jsonl(stripped)):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{name}: invalid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. an integer longer than Python converts
            raise DataError(f"{name}: invalid JSON ({_first_line(exc)})") from None
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list):
            raise DataError(f"{name}: expected a list of records, got {type(records).__name__}")
        return records
    return _parse_jsonl(text, name)


def _parse_jsonl(text: str, name: str) -> list:
    records = []
    # Only "\n" ends a record: str.splitlines would also split inside strings at U+2028, U+0085, ...
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {number}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{name}: line {number}: invalid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. an integer longer than Python converts
            raise DataError(f"{name}: line {number}: invalid JSON ({_first_line(exc)})") from None
    return records


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_jsonl(text: str) -> bool:
    first = text.split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict) and "\n" in text.strip()
    except (ValueError, RecursionError):  # not JSON, or JSON that parse_json_file reports properly
        return False


def download(url: str) -> Path:
    """Fetch a URL once into the user cache (a later run reads the cached copy)."""
    cache = Path(os.environ.get("ROLETUNE_CACHE", Path.home() / ".cache" / "roletune")) / "data"
    target = cache / (hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + Path(url).name)
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{url}: cannot reach it ({reason})") from None
    # Write aside and rename so an interrupted download never leaves a truncated cache entry.
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
        tmp.write(body)
    os.replace(tmp.name, target)
    return target


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.endswith((".json", ".jsonl"))


def _read_hub_dataset(dataset_id: str, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset_id}: reading hub datasets needs the `datasets` package") from None
    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as exc:  # the hub raises many types; the user needs the message, not the class
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{dataset_id}: cannot load hub dataset split {split!r} ({first_line})") from None
