"""WaitingThreads: the threads on which ktrace waits in the kernel for a program (notify backend)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from ktrace.tracer.waiting_threads import WaitingThreads

pytestmark = pytest.mark.timeout(30)


def test_a_call_that_never_returns_does_not_hold_the_process_s_exit() -> None:
    """What held ktrace ~1 s after a Ctrl-C (until the kernel gave up on a parked SYN): Python
    joins a ThreadPoolExecutor's workers at exit. Here the call waits for good on a pipe."""
    program = textwrap.dedent(
        """
        import asyncio, os, threading
        from ktrace.tracer.waiting_threads import WaitingThreads

        async def main():
            r, w = os.pipe()
            inside = threading.Event()

            def wait_forever(fd):
                inside.set()
                return os.read(fd, 1)

            call = asyncio.ensure_future(WaitingThreads("test").call_with_fd(r, wait_forever))
            while not inside.is_set():
                await asyncio.sleep(0.01)
            call.cancel()
            print("leaving", flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", program], check=False, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done
    assert done.stdout == "leaving\n"


def test_calls_never_queue_behind_each_other() -> None:
    """Three calls that each wait until all three are inside at once: queued calls would never
    meet (the barrier times out)."""
    barrier = threading.Barrier(3, timeout=10)
    threads = WaitingThreads("test")

    async def main() -> list[int]:
        r, w = os.pipe()
        try:
            return list(await asyncio.gather(*(threads.call_with_fd(r, lambda fd: barrier.wait()) for _ in range(3))))
        finally:
            os.close(r)
            os.close(w)

    assert sorted(asyncio.run(main())) == [0, 1, 2]
    assert threads.started == 3


def test_idle_threads_are_reused() -> None:
    threads = WaitingThreads("test")

    async def main() -> None:
        r, w = os.pipe()
        try:
            for _ in range(5):
                assert await threads.call_with_fd(r, lambda fd: fd * 0 + 7) == 7
        finally:
            os.close(r)
            os.close(w)

    asyncio.run(main())
    assert threads.started == 1


def test_the_call_s_own_descriptor_outlives_the_caller_s_and_is_closed_after_it() -> None:
    threads = WaitingThreads("test")
    seen: list[int] = []

    async def main() -> bytes:
        r, w = os.pipe()
        inside = threading.Event()

        def read(fd: int) -> bytes:
            seen.append(fd)
            inside.set()
            return os.read(fd, 5)

        call = asyncio.ensure_future(threads.call_with_fd(r, read))
        while not inside.is_set():
            await asyncio.sleep(0.01)
        os.close(r)  # the program's socket closed meanwhile: the call's duplicate still reads
        os.write(w, b"hello")
        try:
            return await call
        finally:
            os.close(w)

    assert asyncio.run(main()) == b"hello"
    with pytest.raises(OSError):
        os.fstat(seen[0])  # closed by the thread once the call returned


def test_an_exception_of_the_call_reaches_the_awaiting_task() -> None:
    threads = WaitingThreads("test")

    def fails(fd: int) -> int:
        raise ConnectionRefusedError(111, "refused")

    async def main() -> None:
        r, w = os.pipe()
        try:
            with pytest.raises(ConnectionRefusedError):
                await threads.call_with_fd(r, fails)
            assert await threads.call_with_fd(r, lambda fd: 1) == 1  # the thread lives on
        finally:
            os.close(r)
            os.close(w)

    asyncio.run(main())
    assert threads.started == 1
