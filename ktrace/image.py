"""``ktrace image build``: the agent image from the project's Dockerfile, with docker, podman or buildah.

The Dockerfile installs only wheels from the build context (dist/agent/, made by scripts/agent-wheels), so
every build runs with ``--network none``: the base image is the only thing a builder may fetch. Then the
image is pushed, loaded into a local cluster, or written to an OCI archive, and the line that makes ktrace
use it is printed.

The first half is pure (which builder, which commands, in which order); :func:`build` looks at the machine
(tools on PATH, whether docker's engine answers, the source tree) and runs the plan.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import sys
from collections.abc import Collection
from dataclasses import dataclass

from ktrace.errors import KtraceError

BUILDERS = ("docker", "podman", "buildah")  # the order one is picked in when several are installed
LOAD_TARGETS = ("kind", "minikube", "containerd", "docker")
# Kubernetes' platform architectures -> the machine names in manylinux wheel tags (scripts/agent-wheels --arch).
WHEEL_ARCHES = {"amd64": "x86_64", "arm64": "aarch64", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass(frozen=True)
class Request:
    """What the user asked for (the command line)."""

    tag: str | None = None
    push: bool = False
    load: str | None = None
    oci_archive: str | None = None
    builder: str | None = None
    base: str | None = None
    python_version: str | None = None
    platforms: tuple[str, ...] = ()
    source: str | None = None
    quiet: bool = False
    pull: str | None = None  # the base image: always, missing or never (default: the builder's own)


@dataclass(frozen=True)
class Step:
    what: str  # names the step in the error line when it fails
    argv: tuple[str, ...]
    check: bool = True  # False: its failure is expected and harmless


@dataclass(frozen=True)
class Plan:
    image: str
    builder: str
    steps: tuple[Step, ...]
    loaded: bool  # the image ends up in a local cluster or engine, not (only) in a registry


def default_image(version: str) -> str:
    """The image ktrace runs by default (kube/spec.py), for the version of the source tree built."""
    from ktrace.kube.spec import DEFAULT_IMAGE

    return f"{DEFAULT_IMAGE.rpartition(':')[0]}:{version}"


def _error(message: str, hint: str | None = None) -> KtraceError:
    return KtraceError(message, hint)


def choose_builder(requested: str | None, usable: Collection[str], docker_without_engine: bool) -> str:
    """``usable``: the builders on PATH that can build (docker only when its engine answers)."""
    if requested is not None:
        if requested in usable:
            return requested
        if requested == "docker" and docker_without_engine:
            raise _error(
                "docker is installed but its engine does not answer", "start it, or pass --builder podman|buildah"
            )
        raise _error(f"{requested} is not installed", "install it, or leave --builder out to use what is there")
    for builder in BUILDERS:
        if builder in usable:
            return builder
    if docker_without_engine:
        raise _error(
            "docker is installed but its engine does not answer, and neither podman nor buildah is installed",
            "start docker's engine, or install podman or buildah",
        )
    raise _error("no image builder found: none of docker, podman, buildah is installed", "install one of them")


def parse_platforms(text: str | None) -> tuple[str, ...]:
    """``linux/amd64,linux/arm64`` -> ("linux/amd64", "linux/arm64"); only linux/ARCH of known arches."""
    if not text:
        return ()
    platforms = tuple(p.strip() for p in text.split(",") if p.strip())
    for platform in platforms:
        os_name, _, arch = platform.partition("/")
        if os_name != "linux" or arch not in WHEEL_ARCHES:
            known = ", ".join(f"linux/{a}" for a in WHEEL_ARCHES)
            raise _error(f"--platform {platform!r}: not one of {known}")
    return platforms


def base_python(base: str, explicit: str | None) -> str:
    """The image's Python (X.Y), which the wheels are downloaded for."""
    if explicit is not None:
        if not re.fullmatch(r"3\.\d+", explicit):
            raise _error(f"--python-version {explicit!r}: expected 3.N")
        return explicit
    m = re.search(r"(?:^|/)python:(3\.\d+)", base)
    if m is None:
        raise _error(
            f"cannot tell the Python version of the base image {base}",
            "pass --python-version X.Y (the wheels are made for the image's Python)",
        )
    return m.group(1)


def dockerfile_base(dockerfile: str) -> str | None:
    """The default of the Dockerfile's ``ARG BASE=...``."""
    m = re.search(r"^ARG BASE=(\S+)", dockerfile, re.MULTILINE)
    return m.group(1) if m else None


def source_version(ktrace_version_py: str) -> str:
    m = re.search(r"^__version__ = \"([^\"]+)\"", ktrace_version_py, re.MULTILINE)
    if m is None:
        raise _error("no __version__ in ktrace_version/__init__.py of the source tree")
    return m.group(1)


def _pull_flags(builder: str, pull: str | None) -> list[str]:
    if pull is None:
        return []
    if builder == "docker":
        if pull == "never":
            raise _error("docker build cannot be told never to pull the base image", "leave out --pull never")
        return ["--pull"] if pull == "always" else []
    if builder == "buildah" and pull == "missing":
        return ["--pull=false"]  # buildah before 1.30 spells "missing" so ("true" checks for a newer one)
    return [f"--pull={pull}"]


def _archive(builder: str, image: str, path: str, fmt: str) -> tuple[str, ...]:
    """Write ``image`` to ``path``: ``fmt`` is "oci" (an OCI archive) or "docker" (what `docker load` reads)."""
    if builder == "buildah":
        return ("buildah", "push", "-q", image, f"{fmt}-archive:{path}:{image}")
    if builder == "podman":
        return ("podman", "save", "-q", "--format", f"{fmt}-archive", "-o", path, image)
    # docker save writes both at once: an OCI image layout with docker's manifest.json (Docker >= 25).
    return ("docker", "save", "-o", path, image)


def _load(target: str, archive: str) -> tuple[str, ...]:
    return {
        "kind": ("kind", "load", "image-archive", archive),  # KIND_CLUSTER_NAME picks the cluster
        "minikube": ("minikube", "image", "load", archive),  # MINIKUBE_PROFILE picks the profile
        "containerd": ("ctr", "-n", "k8s.io", "images", "import", archive),  # CONTAINERD_ADDRESS: the socket
        "docker": ("docker", "load", "-i", archive),
    }[target]


def plan(
    request: Request,
    builder: str,
    source: pathlib.Path,
    python: str,
    version: str,
    default_base: str,
    scratch: pathlib.Path,
) -> Plan:
    """The commands, in order. ``python``: whose grpcio/protobuf the agent gets; ``scratch``: a temporary dir."""
    image = request.tag or default_image(version)
    if any(c.isspace() for c in image) or not image:
        raise _error(f"--tag {image!r} is not an image reference")
    platforms = request.platforms
    multi = len(platforms) > 1
    if multi and (request.load or request.oci_archive or not request.push):
        raise _error(
            "an image for several platforms can only be pushed (a registry keeps its manifest list)",
            "add --push, or build one --platform for --load/--oci-archive",
        )
    base = request.base or default_base
    arches = [WHEEL_ARCHES[p.partition("/")[2]] for p in platforms]
    wheels = ["bash", str(source / "scripts" / "agent-wheels"), "--python", python]
    wheels += ["--python-version", base_python(base, request.python_version)]
    for arch in arches:
        wheels += ["--arch", arch]
    steps = [Step("making the wheels (scripts/agent-wheels)", tuple(wheels))]

    quiet = ("-q",) if request.quiet else ()
    build: list[str] = {"docker": ["docker", "build"], "podman": ["podman", "build"], "buildah": ["buildah", "bud"]}[
        builder
    ]
    if builder == "docker" and multi:
        build = ["docker", "buildx", "build"]
    build += [*quiet, "--network", "none", "--file", str(source / "Dockerfile")]
    if platforms:
        build += ["--platform", ",".join(platforms)]
    build += _pull_flags(builder, request.pull)
    if request.base:
        build += ["--build-arg", f"BASE={request.base}"]
    if multi and builder != "docker":
        # A manifest list of that name from an earlier build would get these images added to it.
        steps.append(Step("removing the earlier manifest list", (builder, "manifest", "rm", image), check=False))
        build += ["--manifest", image]
    else:
        build += ["--tag", image]
    if multi and builder == "docker":
        build += ["--push"]
    steps.append(Step(f"building {image} with {builder}", (*build, str(source))))

    if request.push and not (multi and builder == "docker"):
        if multi:
            push: tuple[str, ...] = (builder, "manifest", "push", *quiet, "--all", image, f"docker://{image}")
        elif builder == "buildah":
            push = ("buildah", "push", *quiet, image, f"docker://{image}")
        else:
            push = (builder, "push", *quiet, image)
        steps.append(Step(f"pushing {image}", push))
    if request.oci_archive:
        steps.append(Step(f"writing {request.oci_archive}", _archive(builder, image, request.oci_archive, "oci")))
    if request.load and not (request.load == "docker" and builder == "docker"):
        archive = str(scratch / "image.tar")
        steps.append(Step("saving the image for loading", _archive(builder, image, archive, "docker")))
        steps.append(Step(f"loading {image} into {request.load}", _load(request.load, archive)))
    return Plan(image=image, builder=builder, steps=tuple(steps), loaded=bool(request.load))


def tools_needed(p: Plan) -> list[str]:
    return sorted({step.argv[0] for step in p.steps})


def usage_lines(p: Plan) -> list[str]:
    """What makes ktrace use the image: a shell line (stdout, so `eval "$(...)"` works) and its ktrace.toml twin."""
    lines = [
        f"export KTRACE_AGENT_IMAGE={shlex.quote(p.image)}",
        f'# or in ktrace.toml: agent-image = "{p.image}"',
    ]
    tag = p.image.rpartition("/")[2].partition("@")[0]
    if p.loaded and (":" not in tag or tag.endswith(":latest")):
        # Kubernetes always pulls :latest by default, and a loaded image is in no registry.
        lines += [
            "export KTRACE_AGENT_PULL_POLICY=IfNotPresent",
            '# or in ktrace.toml: agent-pull-policy = "IfNotPresent"',
        ]
    return lines


# --- the command line and the machine -----------------------------------------------------------------------


def request_of(args: argparse.Namespace) -> Request:
    return Request(
        tag=args.tag,
        push=args.push,
        load=args.load,
        oci_archive=args.oci_archive,
        builder=args.builder,
        base=args.base,
        python_version=args.python_version,
        platforms=parse_platforms(args.platform),
        source=args.source,
        quiet=args.quiet,
        pull=args.pull,
    )


def _is_source(path: pathlib.Path) -> bool:
    return all((path / name).is_file() for name in ("Dockerfile", "ktrace_version/__init__.py", "scripts/agent-wheels"))


def find_source(explicit: str | None) -> pathlib.Path:
    if explicit is not None:
        candidates = [pathlib.Path(explicit)]
    else:
        # An editable install runs from its checkout; otherwise the user is in one.
        candidates = [pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parent.parent]
    for candidate in candidates:
        if _is_source(candidate):
            return candidate.resolve()
    where = explicit or "this directory"
    raise _error(
        f"{where} is not a ktrace source tree (no Dockerfile, ktrace_version/, scripts/agent-wheels)",
        "run it in a clone of ktrace, or pass --source DIR",
    )


def _docker_engine_answers() -> bool:
    import subprocess

    try:
        probe = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def build(request: Request) -> int:
    import shutil
    import subprocess
    import tempfile

    source = find_source(request.source)
    installed = [b for b in BUILDERS if shutil.which(b)]
    docker_without_engine = False
    if "docker" in installed and request.builder in (None, "docker") and not _docker_engine_answers():
        installed.remove("docker")
        docker_without_engine = True
    builder = choose_builder(request.builder, installed, docker_without_engine)
    version = source_version((source / "ktrace_version" / "__init__.py").read_text())
    default_base = dockerfile_base((source / "Dockerfile").read_text())
    if default_base is None:
        raise _error(f"{source / 'Dockerfile'} has no ARG BASE=...", "pass --base IMAGE")
    with tempfile.TemporaryDirectory(prefix="ktrace-image-") as scratch:
        p = plan(request, builder, source, sys.executable, version, default_base, pathlib.Path(scratch))
        missing = [tool for tool in tools_needed(p) if shutil.which(tool) is None]
        if missing:
            raise _error(f"{', '.join(missing)} not found on PATH", "install it, or leave out the option that needs it")
        for step in p.steps:
            print(f"ktrace: {step.what}: {shlex.join(step.argv)}", file=sys.stderr, flush=True)
            # The builders' output goes to stderr: stdout is only for the lines printed at the end.
            done = subprocess.run(step.argv, stdout=sys.stderr, check=False)
            if done.returncode != 0 and step.check:
                raise _error(
                    f"{step.what} failed: {step.argv[0]} exited with {done.returncode}", "see its output above"
                )
    print(f"ktrace: built {p.image} with {builder}", file=sys.stderr)
    print("\n".join(usage_lines(p)))
    return 0
