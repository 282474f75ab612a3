"""Write an OCI image archive from layer tarballs, with no registry and no daemon.

``ctr -n k8s.io images import`` reads the archive: an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/``) in a tar. The image is named by the ``io.containerd.image.name`` annotation, which
containerd uses as the image reference, and by ``org.opencontainers.image.ref.name`` for other tools.

Layers are given as uncompressed tar files (made by GNU tar with numeric owners, so ownership and device
nodes are exact); each is stored as-is, so its digest is also its diff_id.

Usage::

    python3 kube/ociimage.py OUT.tar NAME:TAG --layer a.tar [--layer b.tar ...]
        [--entrypoint JSON] [--cmd JSON] [--env K=V ...] [--user UID] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pathlib
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: where its bytes are (a file or memory), its digest and size."""

    digest: str
    size: int
    path: pathlib.Path | None = None
    data: bytes | None = None


def _file_blob(path: pathlib.Path) -> Blob:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return Blob(f"sha256:{h.hexdigest()}", path.stat().st_size, path=path)


def _json_blob(obj: object) -> Blob:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return Blob(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), data=data)


def image_config(
    diff_ids: Sequence[str],
    *,
    entrypoint: Sequence[str] | None,
    cmd: Sequence[str] | None,
    env: Sequence[str],
    user: str | None,
    workdir: str | None,
) -> dict[str, object]:
    """The OCI image config: what the runtime runs, and the diff_ids that pin the layers."""
    config: dict[str, object] = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *env],
    }
    if entrypoint is not None:
        config["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        config["Cmd"] = list(cmd)
    if user is not None:
        config["User"] = user
    if workdir is not None:
        config["WorkingDir"] = workdir
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }


def _add(tar: tarfile.TarFile, name: str, blob: Blob) -> None:
    info = tarfile.TarInfo(name)
    info.size = blob.size
    info.mode = 0o644
    if blob.path is not None:
        with blob.path.open("rb") as f:
            tar.addfile(info, f)
    else:
        assert blob.data is not None
        tar.addfile(info, io.BytesIO(blob.data))


def write_archive(
    out: pathlib.Path,
    name: str,
    layers: Sequence[pathlib.Path],
    *,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] = (),
    user: str | None = None,
    workdir: str | None = None,
) -> str:
    """Write the archive to ``out`` (atomically) and return the manifest digest."""
    layer_blobs = [_file_blob(p) for p in layers]
    config = _json_blob(
        image_config(
            [b.digest for b in layer_blobs], entrypoint=entrypoint, cmd=cmd, env=env, user=user, workdir=workdir
        )
    )
    manifest = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": LAYER_TYPE, "digest": b.digest, "size": b.size} for b in layer_blobs],
        }
    )
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [
                {
                    "mediaType": MANIFEST_TYPE,
                    "digest": manifest.digest,
                    "size": manifest.size,
                    "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
                }
            ],
        }
    )
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", _json_blob({"imageLayoutVersion": "1.0.0"}))
        seen: set[str] = set()
        for blob in [*layer_blobs, config, manifest]:
            if blob.digest not in seen:
                seen.add(blob.digest)
                _add(tar, f"blobs/sha256/{blob.digest.removeprefix('sha256:')}", blob)
        _add(tar, "index.json", index)
    shutil.move(tmp, out)
    return manifest.digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("name")
    parser.add_argument("--layer", type=pathlib.Path, action="append", required=True)
    parser.add_argument("--entrypoint", type=json.loads)
    parser.add_argument("--cmd", type=json.loads)
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--user")
    parser.add_argument("--workdir")
    args = parser.parse_args(argv)
    digest = write_archive(
        args.out,
        args.name,
        args.layer,
        entrypoint=args.entrypoint,
        cmd=args.cmd,
        env=args.env,
        user=args.user,
        workdir=args.workdir,
    )
    print(digest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
