"""One thread that owns the decode engine: requests from any number of HTTP handlers wait in a bounded
queue and enter the engine as its slots free, so continuous batching runs across requests.

    batcher = Batcher(engine, max_queue=64)
    batcher.start()
    batcher.submit([Job(engine.Request(ids, 64), sink)])   # sink(Update) is called from the engine thread
    batcher.cancel(job)                                       # frees its slot at the next sync

The thread loops: take cancellations, admit waiting jobs into free slots (one prefill for all of
them), run one engine sync (`steps_per_sync` decode steps), hand each job its new tokens. With nothing
to do it sleeps on the queue. A job the engine refuses, or an engine failure, reaches the job's sink as
an exception. A job whose admission fails (prefill or insert) fails alone: the batch it came with is
admitted one job at a time, and the jobs decoding go on. After a failure of the decode step itself
the engine state is rebuilt and the jobs it held fail, so later requests are served; the old state
is deleted before the new one is made, so a rebuild never holds two KV caches. The whole loop body is
inside that handling, and a sink that fails costs only its job. Should the loop still die (a bug, an
injected SystemExit), a supervisor fails the jobs in slots, waits `restart_delay` seconds (doubling
up to 30 while it keeps dying) and starts the loop again with a rebuilt state; jobs still queued
stay queued. `health()` names a problem while the loop is down, when the thread is gone, and when work is
waiting but the loop has not finished a sync for `stall_timeout` seconds (a hung device): the API's
/health answers 503 then. A queued job that is cancelled frees its queue place at once.
"""
from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import jax

from biomedlm_jax.inference import engine as engine_lib
from biomedlm_jax.inference import scheduler as scheduler_lib

log = logging.getLogger("biomedlm_jax.serve")


class Overloaded(Exception):
    """The queue is full: the caller should answer 429 and ask the client to retry."""


class Job:
    """One engine request and where its updates go. `sink` is called from the engine thread with each
    `scheduler.Update` for this job, or with an exception that ended it."""

    _ids = itertools.count()

    def __init__(self, request: engine_lib.Request, sink: Callable[[object], None]):
        self.request, self.sink = request, sink
        self.id = next(Job._ids)
        self.cancelled = False
        self.taken = False  # set (under the batcher's lock) when the engine thread takes it from the queue
        self.finished = False  # set by the engine thread when its last update is handed over
        self.submitted = self.admitted = None  # time.monotonic() of submit and of entering a slot


def _hand(job: Job, item) -> None:
    """job.sink(item); a sink that fails (its client's event loop gone) costs that job only."""
    try:
        job.sink(item)
    except Exception:  # noqa: BLE001
        log.exception("could not hand an update to request %d; dropping it", job.id)
        job.cancelled = True


class Batcher:
    def __init__(self, engine: engine_lib.Engine, max_queue: int, *, stall_timeout: float = 60.0,
                 restart_delay: float = 1.0, on_admit: Optional[Callable[[Job], None]] = None):
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self.engine, self.max_queue = engine, max_queue
        self.stall_timeout, self.restart_delay, self.on_admit = stall_timeout, restart_delay, on_admit
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet admitted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="biomedlm-engine", daemon=True)
        # admitted, finished, cancelled, refused (overload), failed, engine_restarts
        self.stats = collections.Counter()
        self.active = 0
        self._pending: collections.deque = collections.deque()  # taken from the inbox, not yet in a slot
        self._jobs: dict = {}  # id -> Job, for jobs in a slot
        self._sched = None
        self._down = False  # the loop is being rebuilt or restarted
        self.last_sync = time.monotonic()  # when the loop last went round (idle rounds included)

    def start(self) -> "Batcher":
        self._sched = scheduler_lib.Scheduler(self.engine)  # the state, made before the thread serves
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._waiting

    @property
    def alive(self) -> bool:
        """False once the engine thread has died (a batcher not started yet only queues, and is alive)."""
        return self._thread.ident is None or self._thread.is_alive()

    def health(self) -> Optional[str]:
        """None when healthy, else why not: "engine_down" (the thread is gone, or the loop is being
        rebuilt or restarted) or "engine_stalled" (work waits, no sync for stall_timeout seconds)."""
        if not self.alive or self._down:
            return "engine_down"
        if (self._waiting or self.active) and time.monotonic() - self.last_sync > self.stall_timeout:
            return "engine_stalled"
        return None

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all of them or, when the queue cannot hold them, none: Overloaded)."""
        with self._lock:
            if self._waiting + len(jobs) > self.max_queue:
                self.stats["refused"] += 1
                raise Overloaded(f"{self._waiting} requests are waiting (at most {self.max_queue})")
            self._waiting += len(jobs)
        now = time.monotonic()
        for job in jobs:
            job.submitted = now
            self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        """End a job: it never starts if still waiting, or its slot frees at the next sync. A finished
        job costs nothing (a handler may cancel all its jobs when it ends, whatever their state)."""
        with self._lock:
            if job.cancelled or job.finished:
                return
            job.cancelled = True
            if not job.taken:  # still queued: its place frees now, not when the engine reaches it
                self._waiting -= 1
                self.stats["cancelled"] += 1
                return
        self._inbox.put(("cancel", job))

    # --- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        """The thread: the loop, restarted (state rebuilt, jobs in slots failed) should it ever die."""
        delay = self.restart_delay
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._loop()
                return
            except BaseException as e:  # noqa: BLE001 - a bug in the loop itself, or an injected exit
                self._down = True
                self.stats["engine_restarts"] += 1
                log.critical("the engine loop died (%r); restarting it in %.1f s", e, delay, exc_info=True)
                self._fail_slots(RuntimeError(f"the engine failed: {e!r}"))
                self._discard()
                if time.monotonic() - started > 60:  # it had been running: not a crash loop
                    delay = self.restart_delay
                if self._stop.wait(delay):
                    return
                delay = min(2 * delay, 30.0)

    def _discard(self) -> None:
        """Delete the engine state now (a failed one may hold a KV cache) and forget the Scheduler."""
        if self._sched is not None:
            for leaf in jax.tree.leaves(self._sched.state):
                if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                    leaf.delete()
            self._sched = None

    def _rebuild(self):
        """A new Scheduler with a fresh state; the old state is deleted first (never two KV caches)."""
        self._discard()
        self._sched = scheduler_lib.Scheduler(self.engine)
        return self._sched

    def _fail_slots(self, error: Exception, batch: Sequence[Job] = ()) -> None:
        jobs = list(self._jobs.values()) + list(batch)
        self.stats["failed"] += len(jobs)
        for job in jobs:
            _hand(job, error)
        self._jobs.clear()
        self.active = 0

    def _loop(self) -> None:
        sched = self._sched
        if sched is None:  # after a restart
            self._down = True
            sched = self._rebuild()
        self._down = False
        pending, jobs = self._pending, self._jobs
        while not self._stop.is_set():
            self.last_sync = time.monotonic()
            batch = []
            try:
                self._drain(pending, sched, jobs, block=not sched.busy() and not pending)
                while pending and len(batch) < sched.free_slots():
                    job = pending.popleft()
                    with self._lock:
                        if job.cancelled:  # counted by cancel()
                            continue
                        job.taken = True
                        self._waiting -= 1
                    try:
                        self.engine.check(len(job.request.prompt), job.request.max_new_tokens)
                    except ValueError as e:
                        _hand(job, e)
                        continue
                    batch.append(job)
                updates, batch = self._admit(sched, batch)
                now = time.monotonic()
                for job in batch:
                    jobs[job.id], job.admitted = job, now
                    if self.on_admit is not None:
                        self.on_admit(job)
                self.stats["admitted"] += len(batch)
                self.active = len(jobs)
                if sched.busy():
                    updates += sched.step()
                    self.last_sync = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the engine failed: fail its jobs, keep serving
                log.exception("engine failure; %d requests in flight fail; rebuilding the engine state",
                              len(jobs) + len(batch))
                self._down = True
                self._fail_slots(e, batch)
                sched = self._rebuild()
                self._down = False
                continue
            for u in updates:
                job = jobs.get(u.handle)
                if job is None:
                    continue
                if u.done:
                    del jobs[u.handle]
                    job.finished = True
                    self.stats["finished"] += 1
                _hand(job, u)
            self.active = len(jobs)

    def _admit(self, sched, batch: list) -> tuple[list, list]:
        """Admit `batch` (one prefill for all); if that fails, admit the jobs not yet in a slot one at a
        time, so a job whose admission fails (a prompt the prefill or insert cannot take) fails alone
        and the others, and the jobs already decoding, go on. Returns (updates, the jobs admitted)."""
        try:
            return sched.admit([(j.id, j.request) for j in batch]), batch
        except Exception:  # noqa: BLE001 - find the job(s) at fault
            log.warning("admitting %d requests together failed; admitting them one at a time", len(batch),
                        exc_info=True)
        placed = {o[0] for o in sched.owner if o is not None}
        updates, admitted = [], []
        for job in batch:
            if job.id not in placed:
                try:
                    updates += sched.admit([(job.id, job.request)])
                except Exception as e:  # noqa: BLE001 - this job alone fails
                    log.exception("request %d could not be admitted; it fails alone", job.id)
                    self.stats["failed"] += 1
                    _hand(job, e)
                    continue
            admitted.append(job)
        return updates, admitted

    def _drain(self, pending, sched, jobs, block: bool) -> None:
        """Move new jobs to `pending` and apply cancellations; wait for something when idle."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                return
            if isinstance(item, tuple):  # ("cancel", job)
                job = item[1]
                if job.id in jobs and sched.cancel(job.id):
                    del jobs[job.id]
                    self.stats["cancelled"] += 1
                    self.active = len(jobs)
            else:
                pending.append(item)
