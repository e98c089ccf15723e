"""Shared pieces of the hostile-input tests: a FIFO canary outside the allowed roots, loopback servers,
and the checks every refused job must pass. The services themselves are started per module (each
module needs its own settings), from ``service_helpers`` (tests/service, on the pytest pythonpath)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from service_helpers import KEYS

# The source tests' loopback servers (a static HTTP server, one that accepts and never sends).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sources"))

# An error a user reads: one or a few lines naming the problem, never a Python traceback.
MAX_ERROR_CHARS = 2000


class FifoCanary:
    """A named pipe whose writer end blocks in ``open`` until some process opens the pipe for reading.

    A blocking ``open(O_WRONLY)`` of a FIFO returns once a reader has opened it, even if that reader
    closed it again at once (the kernel counts reader opens), so any open for reading — by this
    process, a Ray worker, decord's child or FFmpeg — is seen, however brief.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        os.mkfifo(self.path)
        self.opened = threading.Event()
        self._releasing = False
        self._thread = threading.Thread(target=self._wait, name=f"fifo-canary {self.path.name}", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader opens the FIFO
        if not self._releasing:
            self.opened.set()
        os.close(fd)

    def close(self) -> None:
        """Release the blocked writer (by opening the FIFO ourselves) and remove it."""
        self._releasing = True
        if self._thread.is_alive():
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self._thread.join(timeout=5)
            os.close(fd)
        self.path.unlink(missing_ok=True)


@pytest.fixture
def fifo_canary():
    made: list[FifoCanary] = []

    def make(path: Path) -> FifoCanary:
        canary = FifoCanary(path)
        made.append(canary)
        return canary

    yield make
    for canary in made:
        canary.close()


def job_fields(r, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.job(job_id)).items()}


def wait_final(r, job_id: str, timeout_s: float) -> dict[str, str]:
    """The job's hash once it is final (done, failed, cancelled); AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        fields = job_fields(r, job_id)
        if fields.get("state") in ("done", "failed", "cancelled"):
            return fields
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not final after {timeout_s:g} s: {fields}; "
                                 f"pending {r.xpending(KEYS.jobs, KEYS.group)}")
        time.sleep(0.05)


def assert_readable_failure(fields: dict[str, str], *fragments: str, context: object = "") -> str:
    """The job failed, and its error is a short message holding every fragment, not a traceback."""
    error = fields.get("error", "")
    assert fields.get("state") == "failed", (fields, context)
    assert error, (fields, context)
    assert "Traceback" not in error and 'File "' not in error, (error, context)
    assert len(error) <= MAX_ERROR_CHARS, (len(error), error[:300], context)
    for fragment in fragments:
        assert fragment in error, (fragment, error, context)
    return error


def pending_count(r) -> int:
    return int(r.xpending(KEYS.jobs, KEYS.group)["pending"])


@pytest.fixture(scope="session")
def checks() -> SimpleNamespace:
    """The helpers above, for the test modules (a conftest is not imported by name)."""
    return SimpleNamespace(job_fields=job_fields, wait_final=wait_final,
                           assert_readable_failure=assert_readable_failure, pending_count=pending_count)
