"""The real WANDS search queries (Wayfair, MIT licensed) shipped in ``shared/data/wands``."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from rankserve.errors import ConfigError

ENV_VAR = "RANKSERVE_WANDS_QUERIES"


@dataclass(frozen=True)
class Query:
    query_id: int
    text: str
    query_class: str


def default_path() -> Path:
    """``$RANKSERVE_WANDS_QUERIES``, else ``shared/data/wands/query.csv`` next to the checkout."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    repo = Path(__file__).resolve().parents[3]
    for candidate in (repo.parent / "shared", repo / "shared"):
        path = candidate / "data" / "wands" / "query.csv"
        if path.exists():
            return path
    return repo.parent / "shared" / "data" / "wands" / "query.csv"


def load_queries(path: str | Path | None = None) -> list[Query]:
    """Read the tab-separated ``query_id, query, query_class`` file."""
    path = Path(path) if path else default_path()
    if not path.exists():
        raise ConfigError(f"WANDS query file not found at {path}; set {ENV_VAR} to its location")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = {"query_id", "query", "query_class"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"{path} lacks the columns {sorted(missing)}")
        return [
            Query(int(row["query_id"]), row["query"].strip(), (row["query_class"] or "").strip())
            for row in reader
            if row["query"] and row["query"].strip()
        ]
