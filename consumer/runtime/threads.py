"""``JobThreads``: the threads plain ``def`` handlers run on, bounded and honest about timeouts.

Python cannot stop a thread. When a ``def`` job overruns its ``timeout=``, the worker stops
*waiting* for it (the job is retried or dead-lettered as usual) but the thread runs on until
the function returns by itself: the retry may run while the first run is still going, and the
thread keeps its place in the pool. What follows from that, on purpose:

* The pool holds a fixed number of threads (the most deliveries the worker holds), so hung
  handlers can never make the process start more threads than that.
* A job's timeout counts from the moment its thread starts running it, never from when it was
  queued: a job waiting for a free thread is not "overrunning", it has not started.
* ``exhausted`` is true while every thread is busy with a job that has already timed out; the
  worker then reports not-ready and logs it, because no ``def`` job can start until one of
  those functions returns.
* The threads are daemon threads, so a process whose handler hangs forever can still exit
  after shutdown (``concurrent.futures`` threads are joined at interpreter exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("leveret.worker")
_STOP = object()


@dataclass(eq=False)
class _Work:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    started: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[Any] | None = None
    abandoned: bool = False  # timed out: the caller stopped waiting, the thread may run on
    running: bool = False


class JobThreads:
    def __init__(self, size: int, *, name: str = "leveret-job") -> None:
        self.size = size
        self._name = name
        self._queue: queue.SimpleQueue[_Work | object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._stuck = 0  # threads still running a job whose caller gave up waiting
        self._closed = False
        # Called on the event loop when `exhausted` changes.
        self.on_exhausted_change: Callable[[bool], None] | None = None

    @property
    def stuck(self) -> int:
        return self._stuck

    @property
    def exhausted(self) -> bool:
        return self._stuck >= self.size

    async def run(self, fn: Callable[[], Any], timeout: float | None) -> Any:
        """Run ``fn`` on a pool thread; ``timeout`` counts from when the thread starts it.

        Raises ``TimeoutError`` when it overruns; the thread itself is not stopped (see the
        module docstring). Cancelling the caller before the thread picks the job up means it
        never runs.
        """
        if self._closed:
            raise RuntimeError("the job threads are shut down")
        loop = asyncio.get_running_loop()
        work = _Work(fn, loop)
        work.done = loop.create_future()
        self._submit(work)
        try:
            await work.started.wait()
            if timeout is None:
                return await asyncio.shield(work.done)
            async with asyncio.timeout(timeout):
                return await asyncio.shield(work.done)
        except BaseException:
            # Timed out or cancelled while the thread runs it: account for the thread as stuck
            # until it returns. Before it started, `abandoned` makes the thread skip the job.
            if not work.done.done():
                work.abandoned = True
                if work.running:
                    self._stuck += 1
                    if self._stuck == self.size:
                        self._notify(True)
            raise

    def _submit(self, work: _Work) -> None:
        self._queue.put(work)
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                return
            if len(self._threads) >= self.size:
                return
            thread = threading.Thread(
                target=self._loop, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
        thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Work)
            if not self._call(item.loop, self._begin, item):
                # The loop is gone, or the caller gave up before the job started.
                self._mark_idle()
                continue
            try:
                result = item.fn()
            except BaseException as exc:
                self._call(item.loop, self._finish, item, None, exc)
            else:
                self._call(item.loop, self._finish, item, result, None)
            self._mark_idle()

    def _mark_idle(self) -> None:
        with self._lock:
            self._idle += 1

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop and wait for its answer; False if the loop is gone."""
        answer: queue.SimpleQueue[bool] = queue.SimpleQueue()

        def call() -> None:
            try:
                answer.put(bool(fn(*args)))
            except BaseException:
                answer.put(False)
                raise

        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # loop closed
            return False
        while True:
            try:
                return answer.get(timeout=1.0)
            except queue.Empty:
                if loop.is_closed():
                    return False

    def _begin(self, work: _Work) -> bool:
        if work.abandoned or self._closed:
            return False
        work.running = True
        work.started.set()
        return True

    def _finish(self, work: _Work, result: Any, exc: BaseException | None) -> bool:
        work.running = False
        if work.abandoned:
            self._stuck -= 1
            if self._stuck == self.size - 1:
                self._notify(False)
        assert work.done is not None
        if work.abandoned:
            work.done.cancel()  # nobody waits for it any more: never an unretrieved error
        elif not work.done.done():
            if exc is not None:
                work.done.set_exception(exc)
            else:
                work.done.set_result(result)
        return True

    def _notify(self, exhausted: bool) -> None:
        if self.on_exhausted_change is not None:
            with contextlib.suppress(Exception):
                self.on_exhausted_change(exhausted)

    def log_exhausted(self, exhausted: bool) -> None:
        """The line an operator needs when the pool runs out, and when it recovers."""
        if exhausted:
            log.error(
                "job_threads_exhausted",
                threads=self.size,
                advice="every thread for plain `def` jobs is still running a job that timed "
                "out (Python cannot stop a thread); no `def` job starts until one returns. "
                "Not ready until then; a restart ends them",
            )
        else:
            log.warning("job_threads_available", stuck=self._stuck)

    def shutdown(self) -> None:
        """Stop idle threads; busy ones end when their function returns (daemon threads)."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
