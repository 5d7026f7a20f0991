"""Eval rows on disk as JSON lines, so an interrupted sweep resumes where it stopped.

Each finished cell (task, length, method setting, seed, sample count) is appended as one
line the moment it is done; a rerun with the same arguments skips the cells found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]
KEY_FIELDS = ("kind", "task", "length", "method", "seed", "samples_asked")


def row_key(row: Row) -> tuple:
    return tuple(row.get(f) for f in KEY_FIELDS)


class RowStore:
    """Append-only JSONL file of eval rows."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by an interruption
                    if n != len(self.path.read_text().splitlines()):
                        raise ValueError(f"{self.path}:{n} is not JSON; delete the file to "
                                         "start the sweep afresh") from None
        self._keys = {row_key(r) for r in self.rows}

    def has(self, **key: Any) -> bool:
        return tuple(key.get(f) for f in KEY_FIELDS) in self._keys

    def add(self, row: Row) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self._keys.add(row_key(row))
