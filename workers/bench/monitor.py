"""Peak RSS and CPU seconds per process role (LLM worker, clip actors, driver, Redis, config A), per named
phase of the run, sampled with psutil."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any


class ProcessMonitor:
    """Peak RSS per process role and CPU seconds per role, accumulated per named phase; load average samples."""

    def __init__(self, roles: dict[str, list[int]], totals: dict[str, tuple[str, ...]] | None = None,
                 interval_s: float = 0.25) -> None:
        import psutil

        self.procs: dict[str, list[Any]] = {}
        for role, pids in roles.items():
            self.procs[role] = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    self.procs[role].append(psutil.Process(pid))
        self.totals = totals or {}  # name → roles whose RSS is summed per sample (e.g. the whole service)
        self.interval_s = interval_s
        self.current: str | None = None
        self.peak: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.cpu_s: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.wall_s: dict[str, float] = defaultdict(float)
        self.load: dict[str, list[float]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> ProcessMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        import psutil

        phase = self.current
        if phase is None:
            return
        with self._lock:
            summed: dict[str, int] = defaultdict(int)
            for role, procs in self.procs.items():
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    self.peak[phase][role] = max(self.peak[phase][role], rss)
                    summed[role] += rss
            for name, roles in self.totals.items():
                self.peak[phase][name] = max(self.peak[phase][name], sum(summed[r] for r in roles))
            self.load[phase].append(os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _cpu(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for role, procs in self.procs.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    continue
            out[role] = total
        return out

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, started = self._cpu(), time.perf_counter()
        self.current = name
        self._sample()
        try:
            yield
        finally:
            self._sample()
            self.current = None
            after = self._cpu()
            with self._lock:
                self.wall_s[name] += time.perf_counter() - started
                for role in after:
                    self.cpu_s[name][role] += after[role] - before.get(role, 0.0)

    def summary(self, name: str) -> dict[str, Any]:
        wall = self.wall_s.get(name, 0.0)
        return {
            "peak_rss_mb": {role: round(v / 2**20, 1) for role, v in self.peak[name].items()},
            "cpu_cores_used": {role: round(v / wall, 3) if wall else None for role, v in self.cpu_s[name].items()},
            "load_1m": _stats(self.load[name]),
            "wall_s": round(wall, 2),
        }


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": round(statistics.fmean(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}
