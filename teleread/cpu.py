"""CPU-bound work (DICOM parsing, ECG loading and measurement) off the gRPC threads' GIL.

A small pool of worker processes (spawned, so no locks are inherited from the hub's threads) runs
pure functions on files; results and our typed errors travel back by pickling. With
``workers == 0`` the work runs in the calling thread (used by unit tests and tiny deployments).
A worker that dies on some input (a crashing decoder, the OOM killer) breaks only that call: the
pool is rebuilt and the caller gets a typed error naming the input as unprocessable.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

from teleread.errors import InvalidInput

log = logging.getLogger("teleread.cpu")
T = TypeVar("T")


def default_workers(*, share: float = 0.5) -> int:
    """Processes for a pool that gets ``share`` of the cores: at least 1, at most 4."""
    return max(1, min(int((os.cpu_count() or 1) * share), 4))


def _init_worker(log_level: str, nice: int) -> None:
    from teleread.logs import configure_logging

    configure_logging(log_level)
    if nice:
        os.nice(nice)
    parent = os.getppid()

    def exit_with_parent() -> None:  # a killed hub must not leave its workers behind
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, name="parent-watch", daemon=True).start()


def _warm(modules: tuple[str, ...]) -> int:
    # Import the modules this pool's work needs once per worker, before the first real call.
    import importlib

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


class CpuPool:
    def __init__(self, workers: int, *, log_level: str = "INFO", nice: int = 0, warm: tuple[str, ...] = ()) -> None:
        self._workers = workers
        self._warm = warm
        self._log_level = log_level
        self._nice = nice
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = self._start() if workers > 0 else None

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self._log_level, self._nice),
        )
        for future in [pool.submit(_warm, self._warm) for _ in range(self._workers)]:
            future.result()
        return pool

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if self._pool is None:
            return fn(*args, **kwargs)
        pool = self._pool
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool:
            log.error("a CPU worker died; restarting the pool", extra={"reason": "WORKER_DIED"})
            with self._lock:
                if self._pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._start()
            raise InvalidInput("the file made its processing worker fail", reason="PROCESSING_CRASHED") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
