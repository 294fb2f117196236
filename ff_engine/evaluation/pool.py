"""Spread independent evaluation jobs over spawned worker processes, each with its own model.

Quality sections are many independent (seed, policy, budget) jobs on a small CPU model: processes with one torch
thread each use the cores better than one process with many threads.
"""

from __future__ import annotations

import contextlib

import torch

_WORKER_MODEL = None


def _init_worker(model_path: str) -> None:
    """Pool initializer: one model per worker process, one thread each (the workers share the cores)."""
    global _WORKER_MODEL
    from model_adapters import registry

    torch.set_num_threads(1)
    _WORKER_MODEL = registry.load(model_path, "world-tiny")


def _worker_call(fn_job):
    fn, job = fn_job
    return fn(_WORKER_MODEL, job)


@contextlib.contextmanager
def worker_pool(model_path: str, workers: int):
    """``workers`` spawned processes that each load ``model_path`` once (one torch thread each), or None for 1
    (spawn, not fork: a forked child of a process that has run torch's OpenMP pool can hang)."""
    if workers <= 1:
        yield None
        return
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(model_path,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def run_jobs(model, fn, jobs, pool, desc, progress=True):
    """Yield ``fn(model, job)`` for each of ``jobs`` as it finishes, with a progress bar: in this process, or on
    ``pool``'s workers (their own model; order not kept).  ``fn`` must be a module-level function."""
    from tqdm import tqdm

    results = (fn(model, j) for j in jobs) if pool is None else pool.imap_unordered(_worker_call, [(fn, j) for j in jobs])
    yield from tqdm(results, total=len(jobs), desc=desc, disable=not progress)
