"""Which of the target container's files ktrace mirrors, and how the agent reaches them (pure).

By default: every volume mount of the target container whose volume is a ConfigMap, Secret,
projected (the service-account token directory is one) or downward-API volume: configuration,
small, and what an in-cluster program reads at fixed paths. ``--remote-path PATH`` adds a path
of the target container's filesystem; ``--local-path PATH`` keeps a path (and what is below it)
local. The most specific (longest) of the mount paths, remote and local paths decides.

The agent (an ephemeral container of the same pod) mounts each volume it needs read-only under
``AGENT_VOLUMES`` (an ephemeral container may not use ``subPath``, so a ``subPath`` mount is
served from the whole volume, resolved inside it by the agent). A remote path outside every
volume is read through ``/proc/1/root`` of the target container's process namespace: the agent
then joins it (``targetContainerName``). The agent runs as the target container's user and group
when its spec names them (non-root only), so it reads what the target's process can read, and the
kubelet keeps the service-account token's ownership as it was (it gives a token file to the pod's
one user only while every container runs as that user).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ktrace.remotefs.pathmap import PathRules

from .podenv import expand

AGENT_VOLUMES = "/ktrace/v"
TARGET_ROOT = "/proc/1/root"  # the target container's root, from a process in its PID namespace
CONFIG_VOLUMES = ("configMap", "secret", "projected", "downwardAPI")
FILES_ENV = "KTRACE_AGENT_FILES"  # how the agent is told what it serves (older agents ignore it)

JSON = Mapping[str, Any]


class MountError(ValueError):
    """A bad --remote-path/--local-path."""


def normalize(path: str) -> str:
    """An absolute path without ``.``/``..``/double slashes (lexically: nothing local is looked at)."""
    if not path.startswith("/"):
        raise MountError(f"{path!r} is not an absolute path")
    normal = posixpath.normpath(path)
    return "/" if normal == "//" else normal


def is_under(path: str, root: str) -> bool:
    return root in (path, "/") or path.startswith(root + "/")


@dataclass(frozen=True)
class Served:
    """One path of the target container the agent serves.

    ``path``: as the program sees it; ``base``: the directory the agent reads it from, and inside
    which it resolves ``sub`` (never leaving it); ``follow``: the path is a ``subPath`` mount,
    i.e. the file a link there leads to; ``mount``: it comes from a volume mount (else from
    ``--remote-path``).
    """

    path: str
    base: str
    sub: str = ""
    follow: bool = False
    mount: bool = True

    def as_json(self) -> dict[str, object]:
        return {"path": self.path, "base": self.base, "sub": self.sub, "follow": self.follow}


@dataclass(frozen=True)
class FilePlan:
    served: tuple[Served, ...]
    local: tuple[str, ...]  # --local-path, normalised
    volume_mounts: tuple[dict[str, Any], ...]  # for the agent's ephemeral container
    needs_process_namespace: bool  # a remote path is read through /proc/1/root
    run_as_user: int | None  # the target's, when known and not root
    run_as_group: int | None

    def path_rules(self) -> PathRules:
        """The rules ``PathMap`` applies: the served mounts, the remote and the local paths."""
        return PathRules(
            mounts=[os.fsencode(s.path) for s in self.served if s.mount],
            remote=[os.fsencode(s.path) for s in self.served if not s.mount],
            local=[os.fsencode(p) for p in self.local],
        )

    def env(self) -> list[dict[str, str]]:
        """The agent's environment entry naming what it serves (nothing when nothing is)."""
        if not self.served:
            return []
        return [{"name": FILES_ENV, "value": json.dumps([s.as_json() for s in self.served], separators=(",", ":"))}]


def _effective(pod: JSON, container: JSON, key: str) -> int | None:
    value = (container.get("securityContext") or {}).get(key)
    if value is None:
        value = ((pod.get("spec") or {}).get("securityContext") or {}).get(key)
    return int(value) if value is not None else None


def _volume_kind(volume: JSON) -> str:
    return next((k for k in volume if k != "name"), "")


def plan(
    pod: JSON,
    container_name: str,
    remote_paths: Sequence[str] = (),
    local_paths: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> FilePlan:
    """What the agent serves for ``container_name`` of ``pod``. ``env``: the container's environment,
    for ``subPathExpr``."""
    spec = pod.get("spec") or {}
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    container = next(c for c in containers if c.get("name") == container_name)
    volumes = {str(v["name"]): v for v in spec.get("volumes") or []}
    local = tuple(sorted({normalize(p) for p in local_paths}))
    remote = tuple(sorted({normalize(p) for p in remote_paths}))
    mounts = [(normalize("/" + str(m["mountPath"]).lstrip("/")), m) for m in container.get("volumeMounts") or []]
    config_mounts = [
        (path, m) for path, m in mounts if _volume_kind(volumes.get(str(m["name"])) or {}) in CONFIG_VOLUMES
    ]
    rules = PathRules(
        mounts=[os.fsencode(p) for p, _ in config_mounts],
        remote=[os.fsencode(p) for p in remote],
        local=[os.fsencode(p) for p in local],
    )
    agent_mount: dict[str, str] = {}  # volume name -> where the agent has it

    def agent_base(volume: str) -> str:
        if volume not in agent_mount:
            agent_mount[volume] = f"{AGENT_VOLUMES}/{len(agent_mount)}"
        return agent_mount[volume]

    def sub_path(mount: JSON) -> str:
        text = expand(str(mount["subPathExpr"]), env or {}) if mount.get("subPathExpr") else mount.get("subPath")
        return posixpath.normpath(str(text)).strip("/") if text else ""

    served: dict[str, Served] = {}
    for path, mount in config_mounts:
        if rules.root_of(os.fsencode(path)) is None:
            continue  # kept local by a --local-path
        sub = sub_path(mount)
        served[path] = Served(path, agent_base(str(mount["name"])), sub, follow=bool(sub))

    needs_namespace = False
    for path in remote:
        if rules.root_of(os.fsencode(path)) is None:
            continue  # the same path is also a --local-path: local wins
        holders = [(mp, m) for mp, m in mounts if is_under(path, mp) and str(m["name"]) in volumes]
        if holders:
            mount_path, mount = max(holders, key=lambda h: len(h[0]))
            inner = posixpath.relpath(path, mount_path) if path != mount_path else ""
            sub = posixpath.join(sub_path(mount), inner).strip("/") if inner else sub_path(mount)
            follow = path == mount_path and bool(sub)
            served[path] = Served(path, agent_base(str(mount["name"])), sub, follow=follow, mount=False)
        else:
            needs_namespace = True
            served[path] = Served(path, TARGET_ROOT, path.lstrip("/"), mount=False)

    user = _effective(pod, container, "runAsUser")
    group = _effective(pod, container, "runAsGroup")
    return FilePlan(
        served=tuple(served[p] for p in sorted(served)),
        local=local,
        volume_mounts=tuple({"name": n, "mountPath": where, "readOnly": True} for n, where in agent_mount.items()),
        needs_process_namespace=needs_namespace,
        run_as_user=user if user else None,
        run_as_group=group if user and group is not None else None,
    )
