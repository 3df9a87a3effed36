"""Cases dealt to worker processes (``rmlx-parity run --jobs N``).

A run of small checkpoints is one core's work at a time: torch runs one intra-op thread (the sums are
then the same in every process, ``Settings.threads``) and MLX's CPU kernels run small arrays on one
thread. :func:`run_dealt` deals the plan's cases round-robin to ``jobs`` processes. This process runs
cases 0, N, 2N, ...; each worker, a fresh interpreter (``multiprocessing``'s spawn start method,
started before this process imports torch, so the imports overlap), runs its share and sends each
result back as it finishes. The results go back into plan order, and the workers' kernel checks are
merged by plan order (a shape's check comes from its first case, as in one process), so the record
is the one a single process writes but for its timings (``tests/test_jobs.py``).

Workers are daemons and end with this process; a worker that finds its parent gone stops. A worker
that dies before it finishes (killed, out of memory) costs time, not cases: its unfinished cases run
here, with a note on stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rmlx.errors import InputError

ENV = "RMLX_PARITY_JOBS"  # the default of --jobs: a number or "auto"
MAX_AUTO = 4  # processes "auto" starts at most (each holds its own torch, transformers and checkpoints)
AUTO_BYTES = 256 << 20  # "auto" deals cases only when the checkpoints' weights are this small in all
AUTO_CASES = 16  # ... and gives each process at least this many cases


def auto_jobs(models: list[Path], stream: bool, cases: int | None = None) -> int:
    """``--jobs auto``: one process per usable core (at most ``MAX_AUTO``, and at most one per
    ``AUTO_CASES`` of ``cases`` when given: a worker's start-up, ~8 s of imports, must pay) for
    checkpoints whose weight files total at most ``AUTO_BYTES`` (each process loads every checkpoint);
    else, and when streamed, 1."""
    if stream:
        return 1
    size = sum(f.stat().st_size for m in models for f in Path(m).glob("*.safetensors"))
    if size > AUTO_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_AUTO, MAX_AUTO if cases is None else cases // AUTO_CASES))


def resolve(jobs: int | str, models: list[Path], stream: bool, cases: int | None = None) -> int:
    """A ``--jobs`` value as a number: ``auto`` by :func:`auto_jobs`."""
    return auto_jobs(models, stream, cases) if jobs == "auto" else jobs


def parse_jobs(text: str) -> int | str:
    """``N`` (>= 1) or ``auto``; anything else: ``InputError`` naming the value."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"expected a whole number >= 1 or 'auto', got {text!r}")
    return n


def run_dealt(plan: list, decoded: dict[Path, np.ndarray], settings, keep_captures: bool,
              progress: Callable[[int, int, str], None] | None, kernel_check, jobs: int) -> list:
    """``parity.runner.run_plan`` over ``plan``, its cases dealt round-robin to ``jobs`` processes."""
    from parity.adapter import family_of
    from parity.runner import run_plan

    # the plan's families, registered in each worker as here (a family registered in code, not through
    # the entry points, included); one that cannot be pickled keeps its share in this process
    fams = list({id(f): f for f in (family_of(m) for m in dict.fromkeys(m for m, _ in plan))}.values())

    def here(share: list, tick) -> dict[int, object]:
        if kernel_check is not None:  # run_plan starts the kernels' record afresh: keep what it noted so far
            from rmlx.nn import kernels

            kernel_check.used.update(kernels.in_use())
        return dict(zip((i for i, _ in share),
                        run_plan(share, decoded, settings, keep_captures, tick, kernel_check, len(plan)), strict=True))

    def merge(extra: tuple) -> None:
        if kernel_check is not None:
            kernel_check.merge(*extra)

    results = deal(list(enumerate(plan)), jobs, here, work, (decoded, settings, keep_captures, kernel_check, fams),
                   progress, merge, "case")
    return [results[i] for i in range(len(plan))]


def deal(items: list[tuple[int, object]], jobs: int, here: Callable[[list, Callable | None], dict[int, object]],
         target: Callable, args: tuple, progress: Callable[[int, int, str], None] | None = None,
         merge: Callable[[tuple], None] | None = None, what: str = "item",
         unit: Callable[[tuple[int, object]], int] | None = None) -> dict[int, object]:
    """Deal ``items`` ((index, item)) round-robin to ``jobs`` processes (by ``unit(item)`` when given:
    items of one unit go together): ``here(share, tick)`` runs this process's share (and any a worker
    could not finish), ``target(conn, parent, share, *args)`` a worker's, sending ("result", index,
    value) as each finishes, optionally ("extra", ...) for ``merge``, then ("end",). Returns {index:
    value} of every item."""
    # OpenMP threads that wait passively: spinning after a parallel region (MKL's, under MLX), they take
    # the core another process computes on (measured: a self-test of 6 defects on 2 processes, 27.2 s
    # wall and 45.3 s CPU; waiting passively 20.0 s and 33.2 s). The thread counts stay as they are, so
    # the sums do too (one thread per process, OMP_NUM_THREADS=1, changes MKL's fp32 sums under MLX).
    # The workers inherit it, and so does this process when its OpenMP runtime is not loaded yet; a
    # value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    shares: list[list] = [[] for _ in range(jobs)]
    for n, item in enumerate(items):
        shares[(n if unit is None else unit(item)) % jobs].append(item)
    workers = []
    for share in shares[1:]:
        try:
            workers.append(_Worker(target, share, args))
        except Exception as e:  # no process could be started here: the share runs in this process
            print(f"rmlx-parity: note: a worker process did not start ({type(e).__name__}: {e}); "
                  f"its {what}s run in this one", file=sys.stderr)
            shares[0] = sorted(shares[0] + share, key=lambda item: item[0])

    def tick(done: int, total: int, label: str) -> None:
        if progress and label != "done":
            progress(done + sum(len(w.results) for w in workers), total, label)

    try:
        results = here(shares[0], tick)
        for w in workers:
            w.join()
            if w.raised is not None:
                kind, message = w.raised
                raise InputError(message) if kind == "InputError" else RuntimeError(f"worker process: {message}")
            results.update(w.results)
            if merge is not None and w.extra is not None:
                merge(w.extra)
            missing = [(i, item) for i, item in w.share if i not in w.results]
            if missing:
                print(f"rmlx-parity: note: a worker process ended early (exit code {w.process.exitcode}); "
                      f"its {len(missing)} unfinished {what}(s) run in this one", file=sys.stderr)
                results.update(here(missing, None))
    finally:
        for w in workers:
            w.stop()
    if progress:
        progress(len(items), len(items), "done")
    return results


class _Worker:
    """One worker process and the thread here that receives what it sends (a result as it finishes,
    so the worker never waits on a full pipe)."""

    def __init__(self, target: Callable, share: list, args: tuple):
        ctx = multiprocessing.get_context("spawn")
        self.share = share
        self.results: dict[int, object] = {}
        self.extra: tuple | None = None
        self.raised: tuple[str, str] | None = None
        receive, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=target, args=(send, os.getpid(), share, *args), daemon=True,
                                   name="rmlx-parity worker")
        self.process.start()
        send.close()  # this process keeps only the receiving end: EOF once the worker is gone
        self.thread = threading.Thread(target=self._receive, args=(receive,), daemon=True)
        self.thread.start()

    def _receive(self, conn) -> None:
        try:
            while True:
                kind, *payload = conn.recv()
                if kind == "result":
                    self.results[payload[0]] = payload[1]
                elif kind == "extra":
                    self.extra = tuple(payload)
                elif kind == "raised":
                    self.raised = tuple(payload)
                elif kind == "end":
                    return
        except (EOFError, OSError):  # the worker died: deal() runs what is missing
            return
        finally:
            conn.close()

    def join(self) -> None:
        self.thread.join()
        self.process.join(timeout=30)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)


def serve(conn, parent: int, run: Callable[[Callable[[int, object], None]], tuple | None]) -> None:
    """A worker's side of the pipe: ``run(send)`` calls ``send(index, value)`` as each item finishes
    and returns an extra tuple for the parent's ``merge`` (or None); then "end". A raise is sent as
    ("raised", kind, message); a parent that is gone ends the worker."""
    # Ctrl-C reaches every process of the terminal's group: the parent handles it and ends its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def send(i: int, value) -> None:
        if os.getppid() != parent:  # the parent is gone: nobody reads what this worker would send
            os._exit(1)
        conn.send(("result", i, value))

    try:
        extra = run(send)
        if extra is not None:
            conn.send(("extra", *extra))
    except InputError as e:
        conn.send(("raised", "InputError", str(e)))
    except Exception as e:
        conn.send(("raised", type(e).__name__, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    conn.send(("end",))
    conn.close()


def work(conn, parent: int, share: list, decoded: dict, settings, keep_captures: bool, kernel_check,
         families: list) -> None:
    """A worker process of ``run_dealt``: run ``share``, sending each result, then the kernel checks."""
    import rmlx  # noqa: F401  (before mlx: the BLAS MLX calls, rmlx/blas.py)
    from parity.adapter import register
    from parity.runner import run_plan

    for f in families:
        register(f)

    def run(send) -> tuple | None:
        run_plan(share, decoded, settings, keep_captures, None, kernel_check, on_result=send)
        if kernel_check is None:
            return None
        from rmlx.nn import kernels

        return kernel_check.results, kernel_check.first_case, kernels.in_use()

    serve(conn, parent, run)
