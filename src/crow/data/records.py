"""Alpaca-style instruction records: a typed record and a validating JSON / JSONL loader."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CrowError


@dataclass(frozen=True)
class Record:
    """One instruction sample: ``instruction`` (+ optional ``input``) and the reference ``output``."""

    instruction: str
    input: str = ""
    output: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def load_records(path: str | os.PathLike, *, require_output: bool = True, what: str = "dataset") -> list[Record]:
    """Read a JSON list or JSONL file of ``{"instruction", "input", "output"}`` objects; every problem is a one-line
    ``CrowError``. Extra keys are ignored; ``input`` may be missing or null; ``output`` may be empty, and missing
    only with ``require_output=False`` (prompt-only test sets)."""
    path = Path(path)
    if not path.exists():
        raise CrowError(f"{what} file {path} does not exist; pass a JSON or JSONL file of instruction records")
    if path.is_dir():
        raise CrowError(f"{what} path {path} is a directory; pass a JSON or JSONL file of instruction records")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CrowError(f"{what} file {path} is not UTF-8 text (byte {e.start}); "
                        "save it as UTF-8 JSON or JSONL") from None
    except OSError as e:
        raise CrowError(f"{what} file {path} cannot be read: {e.strerror}") from None
    stripped = text.strip()
    if not stripped:
        raise CrowError(f"{what} file {path} is empty; it needs a JSON list or JSONL of instruction records")
    if stripped[0] == "[":
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise CrowError(f"{what} file {path} is not valid JSON "
                            f"(line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(items, list):
            raise CrowError(f"{what} file {path} must hold a JSON list of records")
    elif stripped[0] == "{":
        items = []  # JSONL; a single JSON object spread over several lines is an error
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CrowError(f"{what} file {path} line {lineno} is not valid JSON ({e.msg}); "
                                "use a JSON list or one JSON object per line (JSONL)") from None
    else:
        raise CrowError(f"{what} file {path} is neither a JSON list nor JSONL (it starts with {stripped[:10]!r})")
    records = [_to_record(item, i, path, require_output) for i, item in enumerate(items)]
    if not records:
        raise CrowError(f"{what} file {path} holds no records; it needs at least one instruction record")
    return records


def _to_record(item: object, index: int, path: Path, require_output: bool) -> Record:
    where = f"record {index} of {path}"
    if not isinstance(item, dict):
        raise CrowError(f"{where} is a {type(item).__name__}, not an object with 'instruction' and 'output'")
    fields = {}
    for key, required in (("instruction", True), ("input", False), ("output", require_output)):
        value = item.get(key)
        if value is None:
            if required:
                raise CrowError(f"{where} has no '{key}' (keys: {sorted(map(str, item))[:6]}); every record needs one")
            value = ""
        if not isinstance(value, str):
            raise CrowError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        fields[key] = value
    if not fields["instruction"].strip():
        raise CrowError(f"{where} has an empty 'instruction'; remove the record or fill it in")
    return Record(**fields)


def save_records(records: Iterable[Record], path: str | os.PathLike) -> None:
    """Write records as a JSON list (the BackdoorLLM / Alpaca format)."""
    text = json.dumps([r.to_dict() for r in records], indent=1, ensure_ascii=False)
    Path(path).write_text(text + "\n", encoding="utf-8")
