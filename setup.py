"""Build hook: generate the protobuf/gRPC modules from protos/ at build time.

The generated package `ktrace_proto` is never committed and never edited by
hand; it is (re)generated on every build, editable installs included.
"""

from __future__ import annotations

import pathlib
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "ktrace_proto"


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency (pyproject.toml)

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    OUT.mkdir(exist_ok=True)
    (OUT / "__init__.py").write_text('"""Generated from protos/ by setup.py; do not edit."""\n')
    (OUT / "py.typed").write_text("")
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


class GenerateProtos(Command):
    description = "generate ktrace_proto from protos/"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate()


class BuildPy(build_py):
    def run(self) -> None:
        generate()
        super().run()


class Develop(develop):
    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildPy, "develop": Develop, "generate_protos": GenerateProtos})
