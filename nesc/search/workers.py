"""Where evaluations run: in this process, in local worker processes, or on a Ray cluster.

All three hand back ``concurrent.futures.Future``s of ``evaluate_plan``'s JSON result. Local workers are
spawned (a fresh interpreter: no forked torch state) by ``concurrent.futures.ProcessPoolExecutor``;
each gets an equal share of the CPU threads. Ray (the optional ``search`` extra) is imported only when
an address is given; its tasks need the run dir on a filesystem every node sees.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable

from nesc.core.errors import ConfigError


class Inline:
    """Evaluate in this process, one at a time (workers=1: no start-up cost, easy to debug)."""

    def submit(self, fn: Callable, *args) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by future.result() in the caller
            future.set_exception(e)
        return future

    def close(self) -> None:
        pass


class Local:
    """``workers`` spawned processes on this machine."""

    def __init__(self, workers: int) -> None:
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable, *args) -> cf.Future:
        return self.pool.submit(fn, *args[:3], self.threads)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Ray:
    """Tasks on the Ray cluster at ``address`` (``ray.init(address=...)``)."""

    def __init__(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(f"--ray {address}: Ray is not installed; pip install 'nesc[search]' (or ray) on this "
                              f"machine and the cluster's, or drop --ray to evaluate on local workers") from None
        self.ray = ray
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self.remote: dict[Callable, object] = {}

    def submit(self, fn: Callable, *args) -> cf.Future:
        task = self.remote.setdefault(fn, self.ray.remote(fn))
        return task.remote(*args).future()

    def close(self) -> None:
        pass


def executor(workers: int, ray: str | None):
    if ray is not None:
        return Ray(ray)
    return Inline() if workers == 1 else Local(workers)
