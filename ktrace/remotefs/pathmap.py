"""Which paths of the program are the target container's, and where their local copy is (pure).

The tracer asks ``PathMap.lookup(path, write=..., follow=...)`` at a path-taking syscall and gets:

* ``None``: not ours; the syscall runs as it is, on the local path;
* ``Redirect(path)``: run the syscall on this local path instead (in the mirror, or, after a
  symlink of the pod's that points outside what is served, wherever it points);
* ``Refuse(errno)``: fail the syscall with this errno (``EROFS`` for a write to a served path;
  ``ELOOP`` for a symlink loop).

Rules: a ``--remote-path`` or ``--local-path`` that holds the path decides, the longest one, a
local one on a tie; else the longest served mount that holds it; else the path is not ours. (A
``--local-path`` therefore keeps local what is below it, even inside a mounted volume.)

Symlinks inside a served tree: relative ones that stay inside their root are left to the kernel
(the mirror has the same links, so ``lstat``/``readlink`` see them as in the pod and a ConfigMap's
``..data`` swap stays atomic). Links the kernel would resolve differently here than in the pod,
an absolute target or a relative one leaving the root, are resolved here, in the pod's namespace,
for every component the kernel would follow (all but the last one when ``follow`` is false), and
the result mapped again.
"""

from __future__ import annotations

import errno
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MAX_LINKS = 40  # the kernel's MAXSYMLINKS


@dataclass(frozen=True)
class Redirect:
    path: bytes


@dataclass(frozen=True)
class Refuse:
    errno: int


Lookup = Redirect | Refuse | None


def _under(path: bytes, root: bytes) -> bool:
    return root in (path, b"/") or path.startswith(root + b"/")


def _relative(path: bytes, root: bytes) -> bytes:
    if path == root:
        return b""
    return path[len(root) :].lstrip(b"/") if root != b"/" else path.lstrip(b"/")


def normalize(path: bytes) -> bytes:
    normal = posixpath.normpath(path)
    return b"/" if normal == b"//" else normal


@dataclass(frozen=True)
class PathRules:
    """``mounts``: served roots that come from volume mounts; ``remote``/``local``: the user's
    ``--remote-path``/``--local-path``. All absolute and normalised."""

    mounts: Sequence[bytes] = ()
    remote: Sequence[bytes] = ()
    local: Sequence[bytes] = ()

    def root_of(self, path: bytes) -> bytes | None:
        """The served root that holds ``path`` (itself normalised), or None when it stays local."""
        remote = [r for r in self.remote if _under(path, r)]
        local = [r for r in self.local if _under(path, r)]
        if remote or local:
            longest_remote = max(remote, key=len, default=None)
            if longest_remote is not None and len(longest_remote) > max((len(r) for r in local), default=-1):
                return longest_remote
            return None  # a local rule at least as specific
        holding = [m for m in self.mounts if _under(path, m)]
        return max(holding, key=len) if holding else None

    def served_mounts(self) -> list[bytes]:
        """The mounts worth mirroring: those whose own path is not kept local."""
        return [m for m in self.mounts if self.root_of(m) is not None]


@dataclass
class PathMap:
    """``roots``: served root -> its local copy (the mirror's path; it may not exist yet, or any
    more: the syscall then fails with ENOENT, as for a file the pod does not have).

    ``links``: per served root, the symlinks inside it the kernel must not resolve on its own
    (relative path inside the root -> target); ``Mirror`` keeps it current."""

    rules: PathRules
    roots: Mapping[bytes, bytes]
    links: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)

    def lookup(self, path: bytes, *, write: bool = False, follow: bool = True) -> Lookup:
        """``path``: absolute, as the program named it after resolving a relative one against its
        directory (lexically normalised here). ``write``: the call would create, change or remove
        something at the path. ``follow``: the call follows a symlink in the last component."""
        path = normalize(path)
        root = self.rules.root_of(path)
        if root is None or root not in self.roots:
            return None
        for _ in range(MAX_LINKS):
            resolved = self._escaping_link(root, path, follow)
            if resolved is None:
                if write:
                    return Refuse(errno.EROFS)
                return Redirect(self._local(root, path))
            path = resolved
            root_of = self.rules.root_of(path)
            if root_of is None or root_of not in self.roots:
                # The pod's link leads out of what is served: the local file of that path.
                return Refuse(errno.EROFS) if write else Redirect(path)
            root = root_of
        return Refuse(errno.ELOOP)

    def _local(self, root: bytes, path: bytes) -> bytes:
        rel = _relative(path, root)
        base = self.roots[root]
        return base + b"/" + rel if rel else base

    def _escaping_link(self, root: bytes, path: bytes, follow: bool) -> bytes | None:
        """The path with its first link the kernel must not follow itself resolved, or None."""
        links = self.links.get(root)
        if not links:
            return None
        rel = _relative(path, root)
        parts = rel.split(b"/") if rel else []
        # The root's own entry (relative path b"") is a link when the served root is one.
        candidates = [b""] + [b"/".join(parts[: i + 1]) for i in range(len(parts))]
        for index, prefix in enumerate(candidates):
            last = index == len(candidates) - 1
            if last and not follow:
                return None
            target = links.get(prefix)
            if target is None:
                continue
            where = posixpath.join(root, prefix) if prefix else root
            parent = posixpath.dirname(where)
            resolved = target if target.startswith(b"/") else posixpath.join(parent, target)
            rest = parts[index:]  # the components after the link (candidates[i] holds i of them)
            return normalize(posixpath.join(resolved, *rest)) if rest else normalize(resolved)
        return None


def escaping(root_is_dir: bool, rel: bytes, target: bytes) -> bool:
    """Whether a link at ``rel`` (inside its root) with ``target`` resolves outside the root, or is
    absolute: such links are resolved by ``PathMap``, the others by the kernel in the mirror."""
    if target.startswith(b"/"):
        return True
    if not root_is_dir or not rel:
        return True  # the root itself is a link: its target is relative to the root's parent
    depth = len(posixpath.dirname(rel).split(b"/")) if posixpath.dirname(rel) else 0
    for part in target.split(b"/"):
        if part == b"..":
            depth -= 1
            if depth < 0:
                return True
        elif part and part != b".":
            depth += 1
    return False
