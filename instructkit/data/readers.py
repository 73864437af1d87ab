"""Read raw records from the files people keep instruction data in.

:func:`read_records` turns a path into ``(line, record)`` pairs without interpreting the record:
JSON Lines (plain or gzip), JSON documents, Parquet, and folders written by
``datasets.Dataset.save_to_disk``. Deciding what a record *means* is :mod:`instructkit.data.formats`'
job. Every problem is a :class:`~instructkit.data.errors.DataError` that names the file and the line
(or row) so the user can open the file at the right place.

Line numbers are 1-based lines of the file for JSON Lines (blank lines count as lines but are not
records), and 1-based row indices for JSON arrays, Parquet and ``save_to_disk`` folders.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from instructkit.data.errors import DataError, SkipReport

#: File endings read_records understands; a folder written by ``save_to_disk`` is accepted too.
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")

_BOM = b"\xef\xbb\xbf"
# Keys that mark a JSON object as a record itself rather than a wrapper such as {"data": [...]}.
_RECORD_KEYS = frozenset({"conversations", "messages", "instruction", "prompt", "completion",
                          "chosen", "rejected", "response", "output"})
_PARQUET_BATCH = 1024


def json_type_name(value: object) -> str:
    """Name a Python value by its JSON type, as users see it in their file."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def read_records(path: str | Path, on_error: str = "raise",
                 report: SkipReport | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line, record)`` for every record of a data file, streaming where the format allows.

    Supported: ``.jsonl`` and ``.jsonl.gz`` (JSON Lines, read line by line); ``.json`` and
    ``.json.gz`` (a JSON array of objects, a JSON object holding one list of objects such as
    ``{"data": [...]}``, or JSON Lines misnamed ``.json``, detected from the first lines);
    ``.parquet`` (read batch by batch with pyarrow); and a folder written by
    ``datasets.Dataset.save_to_disk``.

    Problems with one line (invalid JSON, bytes that are not UTF-8, a value that is not an object)
    follow ``on_error``. Problems with the whole file (missing, unsupported, a JSON document that does
    not parse, a corrupt gzip or Parquet file) always raise, because no record of it can be counted.

    Args:
        path: The file or ``save_to_disk`` folder.
        on_error: ``"raise"`` to raise the first bad line; ``"skip"`` to add it to ``report`` (which
            also counts it in ``report.total_seen``) and go on. Records that are yielded are *not*
            counted here: the consumer counts what it receives.
        report: Where skipped lines go; required with ``on_error="skip"`` so nothing vanishes.

    Yields:
        ``(line, record)`` with ``line`` 1-based (file line for JSON Lines, row index otherwise).

    Raises:
        DataError: For a bad line under ``on_error="raise"``, or any whole-file problem.
        ValueError: For an unknown ``on_error`` or ``on_error="skip"`` without a report.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if on_error == "skip" and report is None:
        raise ValueError("on_error='skip' needs report=SkipReport() so that skipped lines are counted")
    path = Path(path).expanduser()
    # Whole-file checks run now, not at the first next(), so a wrong path fails where it is passed.
    if not path.exists():
        raise DataError(path, None, None, "file not found",
                        "check the path (relative paths are resolved from the current directory: "
                        f"{Path.cwd()})", reason="missing_file")
    if path.is_dir():
        dataset = _load_saved_dataset(path)
        return _emit(_dataset_rows(dataset), on_error, report)
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _emit(_parquet_rows(path), on_error, report)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _emit(_jsonl_rows(path), on_error, report)
    if name.endswith((".json", ".json.gz")):
        if _looks_like_json_lines(path):
            return _emit(_jsonl_rows(path), on_error, report)
        return _emit(_json_document_rows(path), on_error, report)
    raise DataError(path, None, None, f"unsupported file type '{''.join(path.suffixes) or path.name}'",
                    f"use one of {', '.join(SUPPORTED_EXTENSIONS)} or a folder written by "
                    "datasets.Dataset.save_to_disk (convert CSV with e.g. "
                    "datasets.load_dataset('csv', data_files=...)['train'].to_json('out.jsonl'))",
                    reason="unsupported_format")


def _emit(rows: Iterator[tuple[int, dict | DataError]], on_error: str,
          report: SkipReport | None) -> Iterator[tuple[int, dict]]:
    """Apply the skip policy to the per-line errors the row readers produce in-band."""
    for line, item in rows:
        if isinstance(item, DataError):
            if on_error == "raise":
                raise item
            report.total_seen += 1
            report.add(item)
        else:
            yield line, item


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _corrupt(path: Path, line: int | None, exc: Exception) -> DataError:
    where = f" after line {line}" if line else ""
    return DataError(path, None, None, f"cannot read the file{where}: {exc}",
                     "the file is truncated or corrupt; re-create or re-download it (for gzip, "
                     "check it with `gzip -t`)", reason="corrupt_file")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """One JSON object per line; reads one line at a time so memory stays flat on huge files."""
    offset = 0  # byte offset of the current line, so a bad byte can be found with a hex editor
    line_no = 0
    try:
        with _open_binary(path) as fh:
            for line_no, raw in enumerate(fh, 1):
                start = offset
                offset += len(raw)
                if line_no == 1 and raw.startswith(_BOM):
                    raw, start = raw[len(_BOM):], start + len(_BOM)
                if not raw.strip():
                    continue  # blank lines (often a trailing one) are layout, not records
                yield line_no, _parse_json_line(path, line_no, raw, start)
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, line_no, exc) from None


def _parse_json_line(path: Path, line_no: int, raw: bytes, start: int) -> dict | DataError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _utf8_error(path, line_no, raw[e.start], start + e.start, e.start + 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        fix = ("fix the JSON on this line: each line must be one complete JSON object (look for an "
               "unescaped quote or newline inside a string, a missing comma or a trailing comma)")
        if line_no == 1 and text.strip() in ("{", "["):
            fix = ("the file looks like an indented JSON document, not JSON Lines: name it .json, or "
                   "write one object per line")
        return DataError(path, line_no, None, f"invalid JSON: {e.msg} (column {e.colno})", fix,
                         reason="invalid_json")
    if not isinstance(value, dict):
        return DataError(path, line_no, None,
                         f"the line holds a JSON {json_type_name(value)}, not an object",
                         'write one JSON object per line, e.g. {"instruction": "...", "output": "..."}',
                         reason="not_object")
    return value


def _utf8_error(path: Path, line_no: int, byte: int, offset: int, column: int) -> DataError:
    return DataError(path, line_no, None,
                     f"byte 0x{byte:02x} at byte offset {offset} (byte {column} of the line) is not "
                     "valid UTF-8", "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
                     "in.jsonl > out.jsonl`, or with Python: open(..., encoding='latin-1') then "
                     "write with encoding='utf-8'", reason="invalid_utf8")


def _looks_like_json_lines(path: Path) -> bool:
    """Tell JSON Lines named ``.json`` from a JSON document by its first two non-blank lines.

    A JSON document's first line is rarely a complete object followed by more content; JSON Lines'
    always is. Only two lines are read, so this is cheap even on huge files.
    """
    lines: list[bytes] = []
    try:
        with _open_binary(path) as fh:
            for raw in fh:
                if raw.strip():
                    lines.append(raw.removeprefix(_BOM) if not lines else raw)
                    if len(lines) == 2:
                        break
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, None, exc) from None
    if len(lines) < 2 or not lines[0].lstrip().startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _json_document_rows(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """A whole JSON document; it must be parsed at once, so it is only used for ``.json`` files."""
    try:
        with _open_binary(path) as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, None, exc) from None
    data = data.removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise _utf8_error(path, data.count(b"\n", 0, e.start) + 1, data[e.start], e.start,
                          e.start - line_start + 1) from None
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        # One syntax error makes the whole document unreadable, so this is never skippable.
        raise DataError(path, e.lineno, None,
                        f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno}); the whole "
                        "document is unreadable", "fix the JSON syntax at that place (a missing or "
                        "trailing comma, an unescaped quote), or convert the file to JSON Lines so "
                        "that one bad record can be skipped", reason="invalid_json") from None
    for row, item in enumerate(_document_items(path, value), 1):
        if isinstance(item, dict):
            yield row, item
        else:
            yield row, DataError(path, row, None,
                                 f"array element {row} is a JSON {json_type_name(item)}, not an object",
                                 "make every element of the array a JSON object with the record's "
                                 "fields", reason="not_object")


def _document_items(path: Path, value: object) -> list:
    """The list of records inside a JSON document: the array itself, or the one list a wrapper holds."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) == 1 and not (_RECORD_KEYS & value.keys()):
            return value[lists[0]]
        return [value]  # a single record saved as .json; format detection will judge it
    raise DataError(path, None, None, f"the file holds a JSON {json_type_name(value)}, not records",
                    "write a JSON array of objects, or JSON Lines (one object per line)",
                    reason="not_object")


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """Parquet read by batches: memory is bounded by the batch, not the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(path, None, exc) from None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (pa.ArrowException, OSError) as exc:
        raise _corrupt(path, row, exc) from None


def _load_saved_dataset(path: Path):
    """Open a ``save_to_disk`` folder; a DatasetDict must be narrowed to one split by the user."""
    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(path, None, None, "the folder is not a datasets.save_to_disk folder (it has no "
                        "state.json or dataset_dict.json)", "pass the data file itself (one of "
                        f"{', '.join(SUPPORTED_EXTENSIONS)}), or save the data with "
                        "datasets.Dataset.save_to_disk", reason="unsupported_format")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise _corrupt(path, None, exc) from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset.keys())
        raise DataError(path, None, None, f"the folder holds a DatasetDict with splits {splits}, "
                        "not one dataset", f"point at one split's folder, e.g. {path / splits[0]}",
                        reason="unsupported_format")
    return dataset


def _dataset_rows(dataset) -> Iterator[tuple[int, dict | DataError]]:
    # Iterating a Dataset reads its memory-mapped Arrow files row by row; nothing is copied whole.
    for row, record in enumerate(dataset, 1):
        yield row, record
