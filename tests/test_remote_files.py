"""The target's files end to end without a cluster: a real agent serving a directory laid out as the
kubelet lays out a ConfigMap volume, ``WatchFiles`` over gRPC, the mirror on disk and the path map."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import grpc.aio
import pytest
from agent_helpers import agent_and_client, run
from ktrace_agent import files as agent_files
from ktrace_agent.files import ServedRoot, resolve_in
from ktrace_agent.wire import rpc

from ktrace.remotefs.mirror import Entry, Mirror, MirrorError, base_directory, remove_leftovers
from ktrace.remotefs.pathmap import PathRules, Redirect
from ktrace.remotefs.session import FilesUnavailable, RemoteFiles

ROOT = b"/etc/app"
SECRET = "hunter2-not-for-logs"


def kubelet_volume(directory: pathlib.Path, files: dict[str, str], version: str) -> None:
    """What the kubelet's atomic writer does: a timestamped directory, ``..data`` pointing at it (swapped by
    rename), and a link per key through ``..data``."""
    stamp = directory / f"..{version}"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
        (stamp / name).chmod(0o644)
    (directory / "..data_tmp").symlink_to(stamp.name)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.rename(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    if old is not None:
        for child in (directory / old).iterdir():
            child.unlink()
        (directory / old).rmdir()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def read(path: Redirect | object) -> str:
    assert isinstance(path, Redirect), path
    return pathlib.Path(os.fsdecode(path.path)).read_text()


def test_a_configmap_volume_mirrored_and_updated(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    kubelet_volume(volume, {"config.yaml": "mode: one\n", "password": SECRET}, "2026_01_01_00_00_00.1")
    (volume / "..2026_01_01_00_00_00.1" / "password").chmod(0o600)
    mirror_base = tmp_path / "mirrors"
    mirror_base.mkdir(mode=0o700)
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        served = [ServedRoot(ROOT, os.fsencode(volume))]
        async with agent_and_client(f"unix:{tmp_path}/agent.sock", served_files=served, files_interval=0.02) as (
            _server,
            client,
        ):
            assert client.info.file_roots == (ROOT,)
            reports: list[str] = []
            remote = RemoteFiles([ROOT], PathRules(mounts=[ROOT]), Mirror.create(str(mirror_base)), reports.append)
            try:
                await remote.start(client)
                paths = remote.path_map
                directory = pathlib.Path(remote.mirror.directory)
                assert stat.S_IMODE(directory.stat().st_mode) == 0o700
                assert read(paths.lookup(ROOT + b"/config.yaml")) == "mode: one\n"
                assert read(paths.lookup(ROOT + b"/password")) == SECRET
                # The links are the pod's: lstat and readlink see them.
                copy = pathlib.Path(os.fsdecode(paths.roots[ROOT]))
                assert os.readlink(copy / "config.yaml") == "..data/config.yaml"
                assert os.readlink(copy / "..data") == "..2026_01_01_00_00_00.1"
                assert sorted(os.listdir(copy)) == sorted(os.listdir(volume))
                assert stat.S_IMODE((copy / "..2026_01_01_00_00_00.1" / "password").stat().st_mode) == 0o600
                held = open(copy / "config.yaml")  # noqa: SIM115 - open across the update on purpose
                inode = copy.stat().st_ino

                kubelet_volume(volume, {"config.yaml": "mode: two\n", "password": SECRET}, "2026_01_01_00_01_00.2")
                await until(lambda: read(paths.lookup(ROOT + b"/config.yaml")) == "mode: two\n", 10, "the new version")
                assert os.readlink(copy / "..data") == "..2026_01_01_00_01_00.2"
                assert copy.stat().st_ino == inode  # changed in place, as the kubelet changes the volume
                # The old version goes after the swap (links first, then removals, as the kubelet does).
                await until(lambda: not (copy / "..2026_01_01_00_00_00.1").exists(), 10, "the old version's removal")
                assert held.read() == "mode: one\n"  # a file open before the update reads what it opened
                held.close()
                assert reports == []
            finally:
                await remote.close()
            assert not directory.exists()

    run(scenario())
    assert SECRET not in caplog.text


def test_only_served_roots_and_only_with_the_token(tmp_path: pathlib.Path) -> None:
    (tmp_path / "served").mkdir()

    async def scenario() -> None:
        served = [ServedRoot(ROOT, os.fsencode(tmp_path / "served"))]
        async with agent_and_client(f"unix:{tmp_path}/agent.sock", served_files=served) as (_server, client):
            for roots in ([b"/etc"], [b"/"], [ROOT + b"/.."], [os.fsencode(tmp_path)]):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in client.watch_files(roots):
                        pass
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            async with grpc.aio.insecure_channel(rpc.grpc_target(client_address(tmp_path))) as channel:
                stub = rpc.Stub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                    async for _ in stub.watch_files(rpc.WatchFilesRequest(roots=[ROOT]), metadata=()):
                        pass
                assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(scenario())


def client_address(tmp_path: pathlib.Path) -> str:
    return f"unix:{tmp_path}/agent.sock"


def test_an_agent_without_files_is_told_apart(tmp_path: pathlib.Path) -> None:
    """An older agent (or one started without --files) offers no roots: ktrace says so, once."""

    async def scenario() -> None:
        async with agent_and_client(f"unix:{tmp_path}/agent.sock") as (_server, client):
            assert client.info.file_roots == ()
            remote = RemoteFiles([ROOT], PathRules(mounts=[ROOT]), Mirror.create(str(tmp_path)), print)
            try:
                with pytest.raises(FilesUnavailable, match="older than this ktrace"):
                    await remote.start(client)
            finally:
                await remote.close()

    run(scenario())


def test_a_root_that_cannot_be_read_and_comes_back(tmp_path: pathlib.Path) -> None:
    base = tmp_path / "base"
    base.mkdir()

    async def scenario() -> None:
        served = [ServedRoot(ROOT, os.fsencode(base), b"later")]
        async with agent_and_client(f"unix:{tmp_path}/agent.sock", served_files=served, files_interval=0.02) as (
            _server,
            client,
        ):
            reports: list[str] = []
            mirrors = tmp_path / "mirrors"
            mirrors.mkdir(mode=0o700)
            remote = RemoteFiles([ROOT], PathRules(mounts=[ROOT]), Mirror.create(str(mirrors)), reports.append)
            try:
                await remote.start(client)
                assert reports == [
                    "warning: cannot read /etc/app in the target container: ENOENT "
                    "(hint: the program sees no such file)"
                ]
                local = remote.path_map.lookup(ROOT + b"/x")
                assert isinstance(local, Redirect) and not os.path.exists(local.path)
                (base / "later").mkdir()
                (base / "later" / "x").write_text("here")
                await until(lambda: os.path.exists(local.path), 10, "the root to appear")
                assert reports[-1] == "/etc/app can be read in the target container again"
            finally:
                await remote.close()

    run(scenario())


def test_large_files_span_messages(tmp_path: pathlib.Path) -> None:
    (tmp_path / "v").mkdir()
    big = os.urandom(3 * agent_files.CHUNK_BYTES + 12345)
    (tmp_path / "v" / "big").write_bytes(big)
    (tmp_path / "v" / "small").write_bytes(b"s")

    async def scenario() -> None:
        served = [ServedRoot(ROOT, os.fsencode(tmp_path / "v"))]
        async with agent_and_client(f"unix:{tmp_path}/agent.sock", served_files=served) as (_server, client):
            remote = RemoteFiles([ROOT], PathRules(mounts=[ROOT]), Mirror.create(str(tmp_path)), print)
            try:
                await remote.start(client)
                found = remote.path_map.lookup(ROOT + b"/big")
                assert isinstance(found, Redirect)
                assert pathlib.Path(os.fsdecode(found.path)).read_bytes() == big
            finally:
                await remote.close()

    run(scenario())


def test_resolve_in_stays_inside_the_base(tmp_path: pathlib.Path) -> None:
    base = tmp_path / "base"
    (base / "dir").mkdir(parents=True)
    (base / "dir" / "file").write_text("x")
    (base / "rel").symlink_to("dir/file")
    (base / "abs").symlink_to("/dir")  # absolute: from the base, as in a chroot
    (base / "up").symlink_to("../../../../dir")  # ".." stops at the base
    (base / "loop").symlink_to("loop")
    b = os.fsencode(base)
    assert resolve_in(b, b"rel", follow_last=True) == b + b"/dir/file"
    assert resolve_in(b, b"rel", follow_last=False) == b + b"/rel"
    assert resolve_in(b, b"abs/file", follow_last=True) == b + b"/dir/file"
    assert resolve_in(b, b"up/file", follow_last=True) == b + b"/dir/file"
    assert resolve_in(b, b"../../dir/file", follow_last=False) == b + b"/dir/file"
    with pytest.raises(OSError, match="Too many levels"):
        resolve_in(b, b"loop", follow_last=True)
    with pytest.raises(NotADirectoryError):
        resolve_in(b, b"rel/x", follow_last=True)


def test_the_mirror_changes_a_tree_in_place(tmp_path: pathlib.Path) -> None:
    mirror = Mirror.create(str(tmp_path))
    root = [Entry(b"", "directory", 0o755)]
    first = [
        *root,
        Entry(b"a", "regular", 0o644, data=b"1"),
        Entry(b"d", "directory", 0o555),
        Entry(b"d/x", "regular", 0o400, data=b"x"),
        Entry(b"keep", "regular", 0o644, data=b"k"),
    ]
    mirror.replace(0, first)
    copy = pathlib.Path(os.fsdecode(mirror.local_path(0)))
    inode, kept = copy.stat().st_ino, (copy / "keep").stat().st_ino
    links = mirror.replace(
        0,
        [
            *root,
            Entry(b"b", "symlink", link=b"/etc/passwd"),
            Entry(b"c", "symlink", link=b"b"),
            Entry(b"keep", "regular", 0o644, data=b"k"),
            Entry(b"a", "directory", 0o755),  # a file that became a directory
        ],
    )
    assert copy.stat().st_ino == inode  # the same directory: an inotify watch on it goes on
    assert (copy / "keep").stat().st_ino == kept  # unchanged files are left alone
    assert sorted(os.listdir(copy)) == ["a", "b", "c", "keep"] and (copy / "a").is_dir()
    assert links == {b"b": b"/etc/passwd"}  # the absolute one only: PathMap resolves it
    mirror.replace(1, [Entry(b"", "regular", 0o400, data=b"file root")])
    assert pathlib.Path(os.fsdecode(mirror.local_path(1))).read_bytes() == b"file root"
    mirror.replace(1, [Entry(b"", "directory", 0o755)])  # a root that became a directory
    assert pathlib.Path(os.fsdecode(mirror.local_path(1))).is_dir()
    with pytest.raises(ValueError, match="leaves its root"):
        mirror.replace(2, [*root, Entry(b"../x", "regular")])
    assert sorted(os.listdir(mirror.directory)) == ["0", "1"]  # no temporary names left
    mirror.close()
    assert not os.path.exists(mirror.directory)


def test_the_private_directory_is_checked(tmp_path: pathlib.Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    assert base_directory({"XDG_RUNTIME_DIR": str(runtime)}) == str(runtime / "ktrace")
    assert stat.S_IMODE((runtime / "ktrace").stat().st_mode) == 0o700
    (runtime / "ktrace").chmod(0o755)
    with pytest.raises(MirrorError, match="mode 0700"):
        base_directory({"XDG_RUNTIME_DIR": str(runtime)})


def test_leftovers_of_a_killed_run_are_removed_and_live_ones_kept(tmp_path: pathlib.Path) -> None:
    code = (
        "import sys, os; from ktrace.remotefs.mirror import Mirror, Entry;"
        "m = Mirror.create(sys.argv[1]); m.replace(0, [Entry(b'', 'directory', 0o555),"
        "Entry(b'secret', 'regular', 0o400, data=b'x')]); print(m.directory, flush=True); sys.stdin.read()"
    )
    killed = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    alive = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout is not None and alive.stdout is not None
        dead_dir = killed.stdout.readline().strip()
        live_dir = alive.stdout.readline().strip()
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert os.path.isdir(dead_dir)
        assert remove_leftovers(str(tmp_path)) == [dead_dir]
        assert not os.path.exists(dead_dir) and os.path.isdir(live_dir)
    finally:
        for proc in (killed, alive):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
            if proc.stdin is not None:
                proc.stdin.close()
    remove_leftovers(str(tmp_path))
    assert not os.path.exists(live_dir)
    # `ktrace cleanup` on a machine where ktrace never kept files makes no directory.
    assert remove_leftovers(str(tmp_path / "none")) == [] and not (tmp_path / "none").exists()


def test_a_version_is_sent_in_bounded_chunks_and_completed_only_if_unchanged(tmp_path: pathlib.Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (2 * agent_files.CHUNK_BYTES + 5))
    (tmp_path / "small").write_text("s")
    top = os.fsencode(tmp_path)
    messages = list(agent_files.version_messages(ROOT, top, agent_files.scan(top)))
    assert [m.first for m in messages] == [True] + [False] * (len(messages) - 1)
    assert [m.last for m in messages] == [False] * (len(messages) - 1) + [True]
    assert all(sum(len(e.data) for e in m.entries) <= agent_files.CHUNK_BYTES for m in messages)
    assert len(messages) >= 4
    # Changed after the scan (a kubelet update caught midway): the version is never completed.
    pending = agent_files.version_messages(ROOT, top, agent_files.scan(top))
    next(pending)
    (tmp_path / "new").write_text("n")
    with pytest.raises(agent_files.Changed):
        list(pending)
