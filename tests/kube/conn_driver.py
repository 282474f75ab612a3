"""A program for the kube tests to run under ``ktrace run``, driven by lines on stdin:

    get URL          fetch URL over a new connection: "got <body>" or "error <reason>"
    hold HOST PORT   connect, print "held", block in recv until the connection ends: "reset", "eof" or "error ..."

SIGTERM is reported ("sigterm") and ends the loop at the next command, so a test sees what happened to
a held connection before the program goes. Runs with the system's python3 (standard library only).
"""

from __future__ import annotations

import errno
import signal
import socket
import sys
import urllib.request
from types import FrameType

terminated = False


def on_term(signum: int, frame: FrameType | None) -> None:
    global terminated  # noqa: PLW0603 - a signal handler has nowhere else to put it
    terminated = True
    print("sigterm", flush=True)


def hold(host: str, port: int) -> str:
    try:
        conn = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        return f"error {errno.errorcode.get(exc.errno or 0, exc)}"
    conn.settimeout(None)
    print("held", flush=True)
    try:
        data = conn.recv(1)
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return f"error {errno.errorcode.get(exc.errno or 0, exc)}"
    finally:
        conn.close()
    return "eof" if not data else "data"


def main() -> None:
    signal.signal(signal.SIGTERM, on_term)
    for line in sys.stdin:
        command, *args = line.split() or [""]
        if command == "get":
            try:
                with urllib.request.urlopen(args[0], timeout=10) as response:
                    print("got", response.read().decode().strip(), flush=True)
            except OSError as exc:
                print("error", exc, flush=True)
        elif command == "hold":
            print(hold(args[0], int(args[1])), flush=True)
        if terminated:
            return


if __name__ == "__main__":
    main()
