"""Progress a person can read while a run works: rows done, rows/s and ETA, overall and per
shard. A live line on a terminal, plain log lines (one per interval) in logs and CI.

Shards are keyed by a label (`s3`, or `<run>/s3` when several runs share the pool). Rows count
from what the workers report between commits (`TTTWorker.progress`), so a long
chunk still shows movement; a shard whose worker died is rewound to its last commit.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import ray

SHOWN_SHARDS = 8  # beyond this many running shards the line shows the slowest ones only


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


class Progress:
    def __init__(self, totals: dict[Any, int], start: dict[Any, int], log: Callable[[str], None],
                 interval_s: float):
        self.totals, self.log, self.interval_s = totals, log, interval_s
        self.seen = {s: start.get(s, 0) for s in totals}
        self.done = {s for s, n in totals.items() if start.get(s, 0) >= n}
        self.started_rows = sum(self.seen.values())
        self.t0 = time.monotonic()
        self.last_print = 0.0
        self.tty = sys.stdout.isatty()

    def committed(self, shard: Any, offset: int, *, done: bool) -> None:
        self.seen[shard] = max(self.seen[shard], offset)
        if done:
            self.done.add(shard)
            self.log(f"{shard} done ({self.totals[shard]} rows); {self._overall()}")

    def rewind(self, shard: Any, offset: int) -> None:
        self.seen[shard] = offset

    def poll(self, pool: Any, running: dict[Any, tuple[int, Any]]) -> bool:
        """Every interval: ask the running workers how far they are and print a line. True when
        any shard advanced since the last poll (what the stall check watches)."""
        now = time.monotonic()
        if now - self.last_print < self.interval_s:
            return False
        self.last_print = now
        advanced = False
        calls = {shard: (slot, pool.actors[slot].progress.remote()) for slot, shard in running.values()}
        for shard, (slot, ref) in calls.items():
            try:
                got = ray.get(ref, timeout=2)
                rows = int(got["rows_done"])
            except Exception:  # a worker that is dying or busy starting: keep the last figure
                continue
            pool.nodes[slot] = got.get("node") or pool.nodes[slot]  # where it runs, before its first chunk
            if rows > self.seen[shard]:
                self.seen[shard], advanced = rows, True
        self._print(sorted(calls))
        return advanced

    def finish(self) -> None:
        if self.tty:
            print(flush=True)

    def _overall(self) -> str:
        """Rows done of the total (never above it), then the rate and ETA once a row is done in
        this driver (before that: how long it has waited, not `0 rows/s`)."""
        total = sum(self.totals.values())
        done = min(total, sum(min(self.seen[s], n) for s, n in self.totals.items()))
        head = f"{done}/{total} rows ({100 * done / max(total, 1):.0f}%)"
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        if done <= self.started_rows:
            return f"{head}, waiting for the first batch ({_duration(elapsed)})"
        rate = (done - self.started_rows) / elapsed
        return f"{head}, {rate:.1f} rows/s, ETA {_duration(max(0.0, (total - done) / rate))}"

    def _print(self, shards: list[Any]) -> None:
        if len(shards) > SHOWN_SHARDS:
            shards = sorted(shards, key=lambda s: self.seen[s] / max(self.totals[s], 1))[:SHOWN_SHARDS]
        parts = ", ".join(f"{s} {self.seen[s]}/{self.totals[s]}" for s in shards)
        line = f"progress {self._overall()}; running: {parts}" if parts else f"progress {self._overall()}"
        if self.tty:
            print(f"\r[pipeline] {line}\033[K", end="", flush=True)
        else:
            self.log(line)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
