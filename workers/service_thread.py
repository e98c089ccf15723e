"""A started ``Service`` driven by its own event loop in a background thread, as ``serve`` drives it in the
main one: for benchmarks and tests that submit jobs and provoke faults from the same process."""

from __future__ import annotations

import asyncio
import threading

from workers.service import Service


class ServiceThread:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="streamvlm-service", daemon=True)

    def start(self) -> ServiceThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.service.run(self._stop))
        except BaseException as exc:  # noqa: BLE001 - kept for alive() / stop() to report
            self._error = exc

    def alive(self) -> bool:
        """True while the service loop runs; a loop that died re-raises its error here."""
        if self._error is not None:
            raise RuntimeError("the service loop died") from self._error
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the loop (running jobs are given back to the queue), then the service and its actors."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=timeout_s)
        if not self._thread.is_alive():
            self._loop.close()
        self.service.stop()
