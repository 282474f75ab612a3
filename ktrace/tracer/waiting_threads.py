"""Threads of ktrace's for calls that wait in the kernel on the program's behalf.

Under the notify backend ktrace performs some of the program's blocking calls itself (a connect()
that waits at the parking lot or for a local peer, a send behind it) while the program's thread
waits for the answer in the kernel. Such a call can wait for minutes (a SYN to a black hole), so:

* the threads are daemon threads. Python joins a ``ThreadPoolExecutor``'s workers at exit, which
  held ktrace's exit (Ctrl-C included) until the kernel gave up on the call; a daemon thread dies
  with the process, and its call with it.
* a call never queues behind another: each stands for a program thread waiting in the kernel, so
  a new thread starts whenever none is idle (at most as many as the program has threads waiting
  at once). Idle threads are kept for the next call: starting one costs about as much as a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("ktrace.tracer")

T = TypeVar("T")


class WaitingThreads:
    def __init__(self, name: str) -> None:
        self._name = name
        self._work: queue.SimpleQueue[Callable[[], Callable[[], None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._started = 0

    @property
    def started(self) -> int:
        return self._started

    async def call_with_fd(self, fd: int, call: Callable[[int], T]) -> T:
        """``call(own)`` on one of these threads, where ``own`` is a duplicate of ``fd`` that the
        thread closes once the call returned: the caller's descriptor may be closed meanwhile and
        its number reused, and a number is never closed under a call still using it. If the
        awaiting task is cancelled, the call goes on to its end unobserved."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        own = os.dup(fd)

        def run() -> Callable[[], None]:
            try:
                result = call(own)
            except BaseException as exc:  # handed to the awaiting task
                outcome: tuple[T | None, BaseException | None] = (None, exc)
            else:
                outcome = (result, None)
            finally:
                os.close(own)

            def deliver() -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_settle, done, outcome)

            return deliver

        try:
            self._submit(run)
        except BaseException:
            os.close(own)  # no thread took the call (none could be started)
            raise
        return await done

    def _submit(self, work: Callable[[], Callable[[], None]]) -> None:
        with self._lock:
            start = self._idle == 0
            if start:
                self._started += 1
                number = self._started
            else:
                self._idle -= 1
        if start:
            threading.Thread(target=self._worker, name=f"{self._name}_{number}", daemon=True).start()
        self._work.put(work)

    def _worker(self) -> None:
        while True:
            work = self._work.get()
            try:
                deliver = work()
            except Exception:
                log.exception("a waiting thread's call failed")
                deliver = None
            # Idle before the result is delivered: the caller's next call, made as soon as it
            # has this one's result, finds this thread free instead of starting another.
            with self._lock:
                self._idle += 1
            if deliver is not None:
                deliver()


def _settle(done: asyncio.Future[T], outcome: tuple[T | None, BaseException | None]) -> None:
    if done.done():
        return  # cancelled by its task
    result, exc = outcome
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)  # type: ignore[arg-type]
