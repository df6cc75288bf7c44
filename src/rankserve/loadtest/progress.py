"""What a load run shows while it runs: progress lines from the per-request timeline as Locust
writes it, and the decision to stop a run in which every request has been failing for a while."""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Row:
    start: float
    latency_ms: float
    ok: bool
    candidates: int
    error: str

    @property
    def end(self) -> float:
        return self.start + self.latency_ms / 1000


def parse_row(fields: list[str]) -> Row | None:
    """One timeline line (``start,latency_ms,ok,retries,candidates,error``); None for the header or a
    line cut short (a run stopped while a user was writing)."""
    try:
        return Row(float(fields[0]), float(fields[1]), fields[2] == "1", int(fields[4]), fields[5] if len(fields) > 5 else "")
    except (ValueError, IndexError):
        return None


@dataclass
class TimelineTail:
    """Reads the rows added to ``directory/timeline-*.csv`` since the last :meth:`read` (only whole lines)."""

    directory: Path
    _offsets: dict = field(default_factory=dict)

    def read(self) -> list[Row]:
        rows = []
        for path in sorted(Path(self.directory).glob("timeline-*.csv")):
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            whole = data[: data.rfind(b"\n") + 1]
            self._offsets[path] = offset + len(whole)
            for fields in csv.reader(io.StringIO(whole.decode(errors="replace"))):
                row = parse_row(fields)
                if row is not None:
                    rows.append(row)
        return rows


def progress_line(elapsed_s: float, duration_s: float, rows: list[Row], interval_s: float, failures_total: int,
                  requests_total: int) -> str:
    """``[  10/60 s] 11.2 req/s ok, 1,050 pairs/s, p50 250 ms, p95 480 ms; failures 0 of 112``: rates and
    percentiles of the successful requests answered during the last ``interval_s``; failures so far."""
    ok = [r for r in rows if r.ok]
    head = f"[{elapsed_s:4.0f}/{duration_s} s] "
    if ok:
        lat = np.array([r.latency_ms for r in ok])
        p50, p95 = np.percentile(lat, [50, 95])
        body = (f"{len(ok) / interval_s:.1f} req/s ok, {sum(r.candidates for r in ok) / interval_s:,.0f} pairs/s, "
                f"p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    else:
        body = "no successful request in the last %.0f s" % interval_s
    tail = f"; failures {failures_total} of {requests_total}"
    failed = [r for r in rows if not r.ok]
    if failed:
        tail += f" (last: {failed[-1].error[:120]})"
    return head + body + tail


def failing_since(rows: list[Row], now: float, run_start: float, span_s: float) -> bool:
    """True when the run has lasted ``span_s`` and every request answered in the last ``span_s``
    failed (at least one did, none succeeded): a server that is gone or refuses everything."""
    if span_s <= 0 or now - run_start < span_s:
        return False
    recent = [r for r in rows if r.end >= now - span_s]
    return bool(recent) and not any(r.ok for r in recent)


def top_errors(errors, n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` commonest error messages and their counts."""
    return Counter(e for e in errors if e).most_common(n)
