"""One run's remote files: the agent's ``WatchFiles`` stream written into a ``Mirror``, and the
``PathMap`` the tracer asks.

``RemoteFiles.start`` returns once every root's first version is on disk (or the agent said it
cannot serve it), so the program never starts before its files are there. After that each new
version (a rotated token, an edited ConfigMap) replaces the old one within a poll interval of
the agent plus the tunnel's latency. When the tunnel is cut the stream is opened again once it
is back; meanwhile the last versions stay. Nothing of the files' content is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence

import grpc
import grpc.aio
from ktrace_agent.wire import rpc

from ktrace.tunnel.client import AgentClient

from .mirror import DIRECTORY, REGULAR, SYMLINK, Entry, Mirror
from .pathmap import PathMap, PathRules

log = logging.getLogger("ktrace.files")

FIRST_VERSION_TIMEOUT = 30.0
RETRY_DELAY = 1.0
_KINDS = {rpc.FILE_DIRECTORY: DIRECTORY, rpc.FILE_REGULAR: REGULAR, rpc.FILE_SYMLINK: SYMLINK}


class FilesUnavailable(Exception):
    """The agent does not serve the files (``older_agent``: an agent image without WatchFiles), or did
    not send them in time."""

    def __init__(self, message: str, *, older_agent: bool = False) -> None:
        super().__init__(message)
        self.older_agent = older_agent


def assemble(messages: Sequence[rpc.FileTree]) -> list[Entry]:
    """The entries of one whole version (its messages, first to last). Pure."""
    order: list[bytes] = []
    heads: dict[bytes, rpc.FileEntry] = {}
    data: dict[bytes, list[bytes]] = {}
    for message in messages:
        for entry in message.entries:
            if entry.path not in heads:
                order.append(entry.path)
                heads[entry.path] = entry
                data[entry.path] = []
            data[entry.path].append(entry.data)
    entries = []
    for path in order:
        head = heads[path]
        kind = _KINDS.get(head.kind)
        if kind is None:
            continue
        entries.append(
            Entry(path, kind, head.mode, head.mtime_ns, b"".join(data[path]) if kind == REGULAR else b"", head.link)
        )
    return entries


class RemoteFiles:
    """``roots``: the served paths (each of the agent's ``file_roots``); ``rules``: how paths map
    to them (``PathRules``). ``path_map`` is what the tracer asks; ``close()`` removes the copies."""

    def __init__(self, roots: Sequence[bytes], rules: PathRules, mirror: Mirror, report: Callable[[str], None]) -> None:
        self.roots = tuple(roots)
        self.mirror = mirror
        self._index = {root: i for i, root in enumerate(self.roots)}
        self.path_map = PathMap(rules, {root: mirror.local_path(i) for root, i in self._index.items()})
        self._report = report
        self._first: dict[bytes, asyncio.Event] = {root: asyncio.Event() for root in self.roots}
        self._failed: dict[bytes, str] = {}
        self._task: asyncio.Task[None] | None = None
        self.versions = 0  # versions written, for tests and --debug

    async def start(self, client: AgentClient, timeout: float = FIRST_VERSION_TIMEOUT) -> None:
        missing = [root for root in self.roots if root not in client.info.file_roots]
        if missing and not client.info.file_roots:
            raise FilesUnavailable(
                "the agent serves no files (an agent image older than this ktrace)", older_agent=True
            )
        if missing:
            raise FilesUnavailable(f"the agent does not serve {os.fsdecode(missing[0])}")
        self._task = asyncio.create_task(self._follow(client))
        waiting = asyncio.create_task(self._all_first())
        try:
            tasks: set[asyncio.Task[None]] = {self._task, waiting}
            done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if waiting in done:
            return
        if self._task in done:
            self._task.result()  # raises what ended it
            raise FilesUnavailable("the agent ended the file stream")
        raise FilesUnavailable(f"the agent did not send the target's files within {timeout:g} s")

    async def _all_first(self) -> None:
        for event in self._first.values():
            await event.wait()

    async def _follow(self, client: AgentClient) -> None:
        while True:
            call = client.watch_files(self.roots)
            pending: dict[bytes, list[rpc.FileTree]] = {}
            try:
                async for message in call:
                    await self._received(message, pending)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.UNIMPLEMENTED,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    raise FilesUnavailable(f"the agent refused to serve the files: {exc.code().name}") from None
                log.debug("file stream broke (%s); following again", exc.code().name)
            finally:
                call.cancel()
            await asyncio.sleep(RETRY_DELAY)

    async def _received(self, message: rpc.FileTree, pending: dict[bytes, list[rpc.FileTree]]) -> None:
        root = message.root
        index = self._index.get(root)
        if index is None:
            return
        if message.HasField("failure"):
            pending.pop(root, None)
            await asyncio.to_thread(self.mirror.remove, index)
            self.path_map.links.pop(root, None)
            reason = message.failure.errno_name
            if self._failed.get(root) != reason:
                self._failed[root] = reason
                self._report(
                    f"warning: cannot read {os.fsdecode(root)} in the target container: {reason} "
                    "(hint: the program sees no such file)"
                )
            self._first[root].set()
            return
        if message.first:
            pending[root] = []
        parts = pending.get(root)
        if parts is None:
            return  # a version whose beginning was lost with a broken stream
        parts.append(message)
        if not message.last:
            return
        del pending[root]
        entries = assemble(parts)
        links = await asyncio.to_thread(self.mirror.replace, index, entries)
        self.path_map.links[root] = links
        self.versions += 1
        if self._failed.pop(root, None) is not None:
            self._report(f"{os.fsdecode(root)} can be read in the target container again")
        log.debug("files: new version of %s (%d entries)", os.fsdecode(root), len(entries))
        self._first[root].set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self.mirror.close()
