"""Stopping on SIGINT / SIGTERM: the signal becomes an `Interrupted` exception raised in the
driver's main thread, so the job unwinds like any failure (workers killed, run.json marked
`interrupted`, the local Ray instance stopped) and the CLI exits 128 + the signal's number
(130 for Ctrl-C, 143 for SIGTERM). Inside `critical()` (a commit, a run.json write) the signal
waits until the block ends, so nothing is left half-written.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict[str, object] = {"installed": False, "depth": 0, "pending": None}


class Interrupted(BaseException):
    """The driver got SIGINT or SIGTERM. A BaseException, like KeyboardInterrupt, so no
    `except Exception` on the way swallows it. `run_ids` names the runs it stopped."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.run_ids: list[str] = []

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interruption(exc: BaseException) -> "Interrupted | None":
    """The `Interrupted` behind `exc`: itself, or the cause of the SystemError Ray's C++ calls
    (`ray.wait`, `ray.get`) raise when the handler raised inside them."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, Interrupted):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _handler(signum: int, frame: object) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def install() -> None:
    """Turn SIGINT and SIGTERM into `Interrupted` (main thread only). Called by the CLI, and again
    after `ray.init`, which sets a SIGTERM handler of its own."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    _state["installed"] = True


def reinstall() -> None:
    """Install again where the CLI installed before (after `ray.init` replaced the SIGTERM handler)."""
    if _state["installed"]:
        install()


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A signal that arrives inside the block is raised when the block ends."""
    _state["depth"] = int(_state["depth"]) + 1
    try:
        yield
    finally:
        _state["depth"] = int(_state["depth"]) - 1
    if not _state["depth"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise Interrupted(int(signum))
