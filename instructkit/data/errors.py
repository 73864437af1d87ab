"""Data errors that point at the exact record, and the ledger of skipped records.

Every problem with user data is reported as a :class:`DataError` naming the file, the line (or row),
the field, what is wrong and how to fix it. With ``on_error: skip`` the same errors are collected in a
:class:`SkipReport` instead of being raised, so nothing is ever dropped without being counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A problem with one record of a data file.

    Args:
        file: Path of the data file.
        line: 1-based line number (JSON Lines) or row number (JSON arrays, Parquet, Arrow); None when
            the problem concerns the whole file.
        field: Dotted path of the offending field, e.g. ``conversations[2].from``; None for the record.
        problem: What is wrong.
        fix: How to fix it.
        reason: Short machine-readable category used to group skips (e.g. ``missing_field``).
    """

    def __init__(self, file: str | Path, line: int | None, field: str | None, problem: str,
                 fix: str, reason: str = "invalid"):
        self.file = str(file)
        self.line = line
        self.field = field
        self.problem = problem
        self.fix = fix
        self.reason = reason
        super().__init__(self.format())

    def format(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.problem}. Fix: {self.fix}"


@dataclass
class SkippedRecord:
    file: str
    line: int | None
    field: str | None
    reason: str
    message: str


@dataclass
class SkipReport:
    """Counts and keeps every record skipped under ``on_error: skip``."""

    records: list[SkippedRecord] = field(default_factory=list)
    total_seen: int = 0

    def add(self, err: DataError) -> None:
        self.records.append(SkippedRecord(err.file, err.line, err.field, err.reason, err.format()))

    def __len__(self) -> int:
        return len(self.records)

    def by_reason(self) -> dict[str, list[SkippedRecord]]:
        out: dict[str, list[SkippedRecord]] = {}
        for r in self.records:
            out.setdefault(r.reason, []).append(r)
        return out

    def summary(self, max_lines: int = 10) -> str:
        """Human-readable summary: counts by reason with the line numbers of each."""
        if not self.records:
            return f"0 of {self.total_seen} records skipped."
        counts = Counter(r.reason for r in self.records)
        lines = [f"{len(self.records)} of {self.total_seen} records skipped:"]
        for reason, recs in sorted(self.by_reason().items(), key=lambda kv: -len(kv[1])):
            where = ", ".join(f"{Path(r.file).name}:{r.line}" for r in recs[:max_lines])
            more = f" (+{len(recs) - max_lines} more)" if len(recs) > max_lines else ""
            lines.append(f"  {reason}: {counts[reason]} [{where}{more}]")
            lines.append(f"    e.g. {recs[0].message}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "total_seen": self.total_seen,
            "skipped": len(self.records),
            "by_reason": {k: len(v) for k, v in self.by_reason().items()},
            "records": [asdict(r) for r in self.records],
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def merge(self, other: "SkipReport") -> None:
        self.records.extend(other.records)
        self.total_seen += other.total_seen
