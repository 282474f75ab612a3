"""Build hooks: the package list, and the protobuf/gRPC modules generated from protos/ at build time.

The generated package `ktrace_proto` is never committed and never edited by hand; it is (re)generated
whenever setuptools looks at the packages (egg_info, which every build and `pip install` runs first and
which refuses a package directory that does not exist yet) and on every build_py, editable installs included.
"""

from __future__ import annotations

import pathlib
from typing import ClassVar

from setuptools import Command, find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.egg_info import egg_info

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
_generated = False


def proto_packages() -> list[str]:
    """One package per directory of protos/ holding .proto files (today just ktrace_proto)."""
    dirs = {p.parent.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto")}
    return sorted(".".join(d.parts) for d in dirs)


def packages() -> list[str]:
    """Discovered, so a new subpackage cannot be left out of the wheel. agent/ installs as ktrace_agent."""
    return [
        *find_packages(include=["ktrace", "ktrace.*", "ktrace_version"]),
        "ktrace_agent",
        *(f"ktrace_agent.{p}" for p in find_packages("agent")),
        *proto_packages(),
    ]


def generate() -> None:
    global _generated  # noqa: PLW0603  # once per setup.py process: egg_info and build_py both ask
    if _generated:
        return
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency (pyproject.toml)

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    for package in proto_packages():
        out = ROOT.joinpath(*package.split("."))
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text('"""Generated from protos/ by setup.py; do not edit."""\n')
        (out / "py.typed").write_text("")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(protos))
    _generated = True


class GenerateProtos(Command):
    description = "generate ktrace_proto from protos/"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate()


class EggInfo(egg_info):
    def run(self) -> None:
        generate()
        super().run()


class BuildPy(build_py):
    def run(self) -> None:
        generate()
        super().run()


class Develop(develop):
    def run(self) -> None:
        generate()
        super().run()


setup(
    packages=packages(),
    cmdclass={"egg_info": EggInfo, "build_py": BuildPy, "develop": Develop, "generate_protos": GenerateProtos},
)
