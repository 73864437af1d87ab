"""Validate a data file on its own: format detection and every record, as a machine-readable report."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from instructkit.curate.text import iter_examples
from instructkit.data.errors import DataError, SkipReport


class _Collecting(SkipReport):
    """A SkipReport that also keeps the DataError objects, for their separate problem and fix."""

    def __init__(self):
        super().__init__()
        self.errors: list[DataError] = []

    def add(self, err: DataError) -> None:
        super().add(err)
        self.errors.append(err)


def _error_dict(e: DataError) -> dict:
    return {"file": e.file, "line": e.line, "field": e.field, "reason": e.reason, "problem": e.problem,
            "fix": e.fix}


def validate_file(path: str | Path, format: str = "auto") -> dict:
    """Detect the format and validate every record of ``path``.

    Returns:
        ``{"file", "ok", "format", "records_seen", "valid", "invalid", "by_reason", "kinds",
        "errors": [{"file", "line", "field", "reason", "problem", "fix"}], "file_error"}``.
        ``file_error`` holds a whole-file problem (missing file, unknown or mixed formats), in
        which case no record is counted.
    """
    report = _Collecting()
    out = {"file": str(path), "ok": False, "format": None, "records_seen": 0, "valid": 0, "invalid": 0,
           "by_reason": {}, "kinds": {}, "errors": [], "file_error": None}
    kinds: Counter = Counter()
    try:
        for ex in iter_examples(path, format, "skip", report):
            out["format"] = out["format"] or ex.canonical["_format"]
            kinds["preference" if "chosen" in ex.canonical else
                  "kto" if "label" in ex.canonical else "sft"] += 1
            out["valid"] += 1
    except DataError as e:
        out["file_error"] = _error_dict(e)
        return out
    if out["format"] is None and format != "auto":
        out["format"] = format
    elif out["format"] is None:
        from instructkit.data.formats import detect_file_format

        try:
            out["format"] = detect_file_format(path)
        except DataError:
            pass
    out.update(records_seen=report.total_seen, invalid=len(report), kinds=dict(kinds),
               by_reason={k: len(v) for k, v in report.by_reason().items()},
               errors=[_error_dict(e) for e in report.errors])
    out["ok"] = out["invalid"] == 0 and out["valid"] > 0
    return out
