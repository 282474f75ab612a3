"""Run a coroutine's first step now, inside the caller, instead of one event-loop turn later.

Python 3.11 has no eager tasks (3.12's ``eager_task_factory``). ktrace needs one on the
program's connect() stop: the gRPC write of the ``open`` frame is started by the first step of
the dial's coroutine, and as a task it waited for the loop's next turn, behind whatever else was
ready by then; on the API-server path that was often the previous connection's closing frame,
whose write gRPC's transport finishes before it starts the next (docs/performance.md,
"A new connection's timeline through the API server").
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class StartedNow(Generic[T]):
    """``coro`` run up to its first suspension in the constructor; ``await`` this for its result
    (once), or ``close()`` it if it will never be awaited (``GeneratorExit`` is thrown into it at
    its suspension point, as for a coroutine closed before it finished)."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._yielded: Any = None
        self._result: T | None = None
        self._error: BaseException | None = None
        self._finished = False
        self._awaited = False
        try:
            self._yielded = coro.send(None)
        except StopIteration as stop:
            self._result, self._finished = stop.value, True
        except BaseException as exc:  # raised to whoever awaits it, as a task would
            self._error, self._finished = exc, True

    def __await__(self) -> Generator[Any, Any, T]:
        if self._awaited:
            raise RuntimeError("a StartedNow can be awaited once")
        self._awaited = True
        if self._finished:
            if self._error is not None:
                raise self._error
            return cast(T, self._result)
        # Hand what the first step waits on to the awaiting task, then relay sends and throws
        # (cancellation) as ``yield from`` would.
        yielded = self._yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                self._coro.close()
                raise
            except BaseException as exc:
                try:
                    yielded = self._coro.throw(exc)
                except StopIteration as stop:
                    return cast(T, stop.value)
            else:
                try:
                    yielded = self._coro.send(sent)
                except StopIteration as stop:
                    return cast(T, stop.value)

    def close(self) -> None:
        """Give up a coroutine that will never be awaited."""
        if not self._awaited:
            self._awaited = True
            self._coro.close()
