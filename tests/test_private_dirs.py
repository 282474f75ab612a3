"""private_dirs.sweep: what it removes and what it leaves (real directories, locks and sockets)."""

from __future__ import annotations

import os
import pathlib
import socket
import time

from ktrace.private_dirs import OWNER, SETTLE, private_dir, sweep


def _aged(path: pathlib.Path) -> None:
    old = time.time() - SETTLE - 60
    os.utime(path, (old, old))


def test_a_held_lock_keeps_the_directory_a_free_one_does_not(tmp_path: pathlib.Path) -> None:
    with private_dir("ktrace-view-", base=str(tmp_path)) as live:
        _aged(pathlib.Path(live, OWNER))
        dead = tmp_path / "ktrace-agent-1-dead"
        dead.mkdir()
        (dead / OWNER).write_text("1\n")  # nobody holds its lock: its ktrace is gone
        _aged(dead / OWNER)
        fresh = tmp_path / "ktrace-view-2-fresh"
        fresh.mkdir()
        (fresh / OWNER).write_text("2\n")  # not locked yet, but too young to judge
        assert sweep(str(tmp_path)) == [str(dead)]
        assert os.path.isdir(live) and fresh.is_dir()
    assert not os.path.exists(live)


def test_old_agent_dirs_go_only_when_nobody_listens(tmp_path: pathlib.Path) -> None:
    stale, live, other = tmp_path / "ktrace-abc", tmp_path / "ktrace-def", tmp_path / "ktrace-notes"
    for d in (stale, live, other):
        d.mkdir()
    closed = socket.socket(socket.AF_UNIX)
    closed.bind(str(stale / "agent.sock"))
    closed.close()  # the file stays, nobody accepts: what a killed ktrace left
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(live / "agent.sock"))
    listening.listen()
    (other / "agent.sock").write_text("not a socket, and not alone\n")
    (other / "more").write_text("x")
    try:
        for d in (stale, live, other):
            _aged(d / "agent.sock")
        assert sweep(str(tmp_path)) == [str(stale)]
        assert live.is_dir() and other.is_dir()
    finally:
        listening.close()
