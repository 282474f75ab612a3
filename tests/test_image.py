"""`ktrace image build`: which builder, which commands (pure), and its failures as a user sees them.

The build itself runs in the kube tests: the test cluster's agent image is made by `scripts/cluster
agent-image`, which calls `ktrace image build --builder buildah ... --oci-archive` (docs/test-cluster.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from ktrace import __version__, image
from ktrace.cli import build_parser
from ktrace.errors import KtraceError

REPO = pathlib.Path(__file__).resolve().parent.parent
SRC = pathlib.Path("/src")
SCRATCH = pathlib.Path("/scratch")
KTRACE = str(pathlib.Path(sys.executable).parent / "ktrace")

pytestmark = pytest.mark.timeout(60)


def plan(builder: str = "buildah", **request: object) -> image.Plan:
    return image.plan(
        image.Request(**request),  # type: ignore[arg-type]
        builder,
        SRC,
        "/venv/bin/python",
        "1.2.3",
        "python:3.11-slim",
        SCRATCH,
    )


def argvs(p: image.Plan) -> list[list[str]]:
    return [list(step.argv) for step in p.steps]


WHEELS = ["bash", "/src/scripts/agent-wheels", "--python", "/venv/bin/python", "--python-version", "3.11"]


def test_builder_is_the_first_installed_and_docker_needs_its_engine() -> None:
    assert image.choose_builder(None, ["podman", "buildah"], docker_without_engine=True) == "podman"
    assert image.choose_builder(None, ["buildah", "docker"], docker_without_engine=False) == "docker"
    assert image.choose_builder("buildah", ["docker", "buildah"], docker_without_engine=False) == "buildah"
    with pytest.raises(KtraceError, match="none of docker, podman, buildah is installed"):
        image.choose_builder(None, [], docker_without_engine=False)
    with pytest.raises(KtraceError, match="docker is installed but its engine does not answer, and neither"):
        image.choose_builder(None, [], docker_without_engine=True)
    with pytest.raises(KtraceError, match="docker is installed but its engine does not answer") as raised:
        image.choose_builder("docker", ["buildah"], docker_without_engine=True)
    assert raised.value.hint == "start it, or pass --builder podman|buildah"
    with pytest.raises(KtraceError, match="podman is not installed"):
        image.choose_builder("podman", ["buildah"], docker_without_engine=False)


def test_the_test_clusters_build_is_a_buildah_build_to_an_oci_archive() -> None:
    p = plan(
        tag="ktrace.local/agent:dev",
        base="ktrace.local/base:1",
        pull="never",
        python_version="3.11",
        oci_archive="/img/agent.tar",
        quiet=True,
    )
    assert argvs(p) == [
        WHEELS,
        [
            "buildah", "bud", "-q", "--network", "none", "--file", "/src/Dockerfile", "--pull=never",
            "--build-arg", "BASE=ktrace.local/base:1", "--tag", "ktrace.local/agent:dev", "/src",
        ],
        ["buildah", "push", "-q", "ktrace.local/agent:dev", "oci-archive:/img/agent.tar:ktrace.local/agent:dev"],
    ]  # fmt: skip
    assert image.usage_lines(p) == [
        "export KTRACE_AGENT_IMAGE=ktrace.local/agent:dev",
        '# or in ktrace.toml: agent-image = "ktrace.local/agent:dev"',
    ]


def test_defaults_build_ktraces_own_reference_for_the_dockerfiles_python() -> None:
    p = plan("docker", push=True)
    assert p.image == "ktrace/agent:1.2.3"
    assert argvs(p) == [
        WHEELS,
        ["docker", "build", "--network", "none", "--file", "/src/Dockerfile", "--tag", "ktrace/agent:1.2.3", "/src"],
        ["docker", "push", "ktrace/agent:1.2.3"],
    ]
    assert image.default_image(__version__).endswith(f":{__version__}")
    from ktrace.kube.spec import DEFAULT_IMAGE

    assert image.default_image(__version__) == DEFAULT_IMAGE


@pytest.mark.parametrize(
    ("builder", "push"),
    [
        ("podman", ["podman", "push", "registry.example/ktrace-agent:x"]),
        ("buildah", ["buildah", "push", "registry.example/ktrace-agent:x", "docker://registry.example/ktrace-agent:x"]),
    ],
)
def test_push_with_each_builder(builder: str, push: list[str]) -> None:
    assert argvs(plan(builder, tag="registry.example/ktrace-agent:x", push=True))[-1] == push


@pytest.mark.parametrize(
    ("builder", "load", "expected"),
    [
        (
            "podman",
            "kind",
            [
                ["podman", "save", "-q", "--format", "docker-archive", "-o", "/scratch/image.tar", "a:1"],
                ["kind", "load", "image-archive", "/scratch/image.tar"],
            ],
        ),
        (
            "buildah",
            "minikube",
            [
                ["buildah", "push", "-q", "a:1", "docker-archive:/scratch/image.tar:a:1"],
                ["minikube", "image", "load", "/scratch/image.tar"],
            ],
        ),
        (
            "docker",
            "containerd",
            [
                ["docker", "save", "-o", "/scratch/image.tar", "a:1"],
                ["ctr", "-n", "k8s.io", "images", "import", "/scratch/image.tar"],
            ],
        ),
        (
            "buildah",
            "docker",
            [
                ["buildah", "push", "-q", "a:1", "docker-archive:/scratch/image.tar:a:1"],
                ["docker", "load", "-i", "/scratch/image.tar"],
            ],
        ),
        ("docker", "docker", []),  # docker built it into its own store already
    ],
)
def test_load_saves_an_archive_and_loads_it(builder: str, load: str, expected: list[list[str]]) -> None:
    p = plan(builder, tag="a:1", load=load)
    assert argvs(p)[2:] == expected
    assert p.loaded


def test_a_loaded_latest_image_gets_a_pull_policy_line() -> None:
    lines = image.usage_lines(plan("podman", tag="ktrace-agent", load="kind"))
    assert lines[2:] == [
        "export KTRACE_AGENT_PULL_POLICY=IfNotPresent",
        '# or in ktrace.toml: agent-pull-policy = "IfNotPresent"',
    ]
    assert len(image.usage_lines(plan("podman", tag="localhost:5000/ktrace-agent:dev", load="kind"))) == 2
    assert len(image.usage_lines(plan("podman", tag="localhost:5000/ktrace-agent", push=True))) == 2


def test_multi_platform_images_are_pushed_as_manifest_lists() -> None:
    platforms = ("linux/amd64", "linux/arm64")
    multi_wheels = [*WHEELS, "--arch", "x86_64", "--arch", "aarch64"]
    common = ["--network", "none", "--file", "/src/Dockerfile", "--platform", "linux/amd64,linux/arm64"]
    assert argvs(plan("docker", tag="r/a:1", push=True, platforms=platforms)) == [
        multi_wheels,
        ["docker", "buildx", "build", *common, "--tag", "r/a:1", "--push", "/src"],
    ]
    p = plan("buildah", tag="r/a:1", push=True, platforms=platforms)
    assert argvs(p) == [
        multi_wheels,
        ["buildah", "manifest", "rm", "r/a:1"],
        ["buildah", "bud", *common, "--manifest", "r/a:1", "/src"],
        ["buildah", "manifest", "push", "--all", "r/a:1", "docker://r/a:1"],
    ]
    assert not p.steps[1].check  # there may be no earlier manifest list to remove
    assert argvs(plan("podman", tag="r/a:1", push=True, platforms=platforms))[-1] == [
        "podman", "manifest", "push", "--all", "r/a:1", "docker://r/a:1",
    ]  # fmt: skip
    for unpushable in ({"push": False}, {"push": True, "load": "kind"}, {"push": True, "oci_archive": "/a.tar"}):
        with pytest.raises(KtraceError, match="can only be pushed"):
            plan("buildah", platforms=platforms, **unpushable)
    one = plan("buildah", tag="r/a:1", platforms=("linux/arm64",), oci_archive="/a.tar")
    assert argvs(one)[0] == [*WHEELS, "--arch", "aarch64"] and "--platform" in argvs(one)[1]


def test_python_version_of_the_base() -> None:
    assert image.base_python("python:3.12-slim", None) == "3.12"
    assert image.base_python("docker.io/library/python:3.13", None) == "3.13"
    assert image.base_python("debian:bookworm", "3.11") == "3.11"
    with pytest.raises(KtraceError, match="cannot tell the Python version of the base image debian:bookworm") as e:
        image.base_python("debian:bookworm", None)
    assert e.value.hint is not None and "--python-version" in e.value.hint
    with pytest.raises(KtraceError, match=r"expected 3\.N"):
        image.base_python("python:3.12", "3")
    assert argvs(plan(base="python:3.12-slim"))[0][-1] == "3.12"


def test_pull_policies() -> None:
    def flags(builder: str, pull: str) -> list[str]:
        build = argvs(plan(builder, pull=pull))[1]
        return [a for a in build if a.startswith("--pull")]

    assert flags("buildah", "missing") == ["--pull=false"]
    assert flags("buildah", "never") == ["--pull=never"]
    assert flags("podman", "missing") == ["--pull=missing"]
    assert flags("docker", "always") == ["--pull"]
    assert flags("docker", "missing") == []
    with pytest.raises(KtraceError, match="docker build cannot be told never to pull"):
        plan("docker", pull="never")


def test_bad_requests() -> None:
    with pytest.raises(KtraceError, match="is not an image reference"):
        plan(tag="a b")
    with pytest.raises(KtraceError, match="--platform 'linux/mips': not one of linux/amd64, linux/arm64"):
        image.parse_platforms("linux/amd64,linux/mips")
    assert image.parse_platforms(" linux/amd64 , linux/arm64 ") == ("linux/amd64", "linux/arm64")


def test_the_repositorys_dockerfile_and_version() -> None:
    assert image.dockerfile_base((REPO / "Dockerfile").read_text()) == "python:3.11-slim"
    assert image.source_version((REPO / "ktrace_version" / "__init__.py").read_text()) == __version__


def test_cli_choices_are_the_modules() -> None:
    """cli.py repeats the choices so `ktrace run` does not import ktrace.image at start."""
    args = build_parser().parse_args(["image", "build"])
    assert isinstance(args, argparse.Namespace) and image.request_of(args) == image.Request()
    for flag, expected in (("--builder", image.BUILDERS), ("--load", image.LOAD_TARGETS)):
        for value in expected:
            assert getattr(build_parser().parse_args(["image", "build", flag, value]), flag[2:]) == value
        with pytest.raises(SystemExit):
            build_parser().parse_args(["image", "build", flag, "other"])


def _image_build(path: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [KTRACE, "image", "build", "--source", str(REPO), *extra]
    environ = {**os.environ, "PATH": path, **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False, env=environ)


def test_no_builder_is_one_line_naming_them(tmp_path: pathlib.Path) -> None:
    r = _image_build(str(tmp_path))
    assert r.returncode == 125, r
    assert r.stderr.strip() == (
        "ktrace: no image builder found: none of docker, podman, buildah is installed (hint: install one of them)"
    )
    assert r.stdout == ""


def test_a_docker_client_without_its_engine(tmp_path: pathlib.Path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    (tmp_path / "docker").symlink_to(docker)
    r = _image_build(str(tmp_path), env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert r.returncode == 125, r
    assert r.stderr.strip().splitlines() == [
        "ktrace: docker is installed but its engine does not answer, and neither podman nor buildah is installed "
        "(hint: start docker's engine, or install podman or buildah)"
    ]


def test_not_a_source_tree(tmp_path: pathlib.Path) -> None:
    r = subprocess.run(
        [KTRACE, "image", "build", "--source", str(tmp_path)], capture_output=True, text=True, timeout=50, check=False
    )
    assert r.returncode == 125, r
    assert r.stderr.strip() == (
        f"ktrace: {tmp_path} is not a ktrace source tree (no Dockerfile, ktrace_version/, scripts/agent-wheels) "
        "(hint: run it in a clone of ktrace, or pass --source DIR)"
    )
