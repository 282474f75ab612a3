"""The pod's environment laid over the local one, and `ktrace env`'s formats (pure; ktrace/kube/envlayer.py)."""

from __future__ import annotations

import json
import subprocess

import pytest

from ktrace.kube.envlayer import MACHINE_VARIABLES, EnvChoice, dotenv_value, overlay, program_env, render

LOCAL = {
    "PATH": "/usr/local/bin:/usr/bin",
    "HOME": "/home/dev",
    "LANG": "en_US.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "xterm",
    "KUBECONFIG": "/home/dev/.kube/dev",
    "EDITOR": "vim",
    "APP_MODE": "local",
}
POD = {
    "PATH": "/app/bin",
    "HOME": "/nonexistent",
    "LANG": "C",
    "APP_MODE": "cluster",
    "DB_PASSWORD": "pw",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "HOSTNAME": "web-1",
}


@pytest.mark.parametrize(
    ("choice", "expected_changes"),
    [
        (
            EnvChoice(),
            {
                "APP_MODE": "cluster",
                "DB_PASSWORD": "pw",
                "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                "HOSTNAME": "web-1",
                "KUBECONFIG": None,
            },
        ),
        (EnvChoice(use_pod=False), {}),
        (
            EnvChoice(include=("LANG", "LC_*")),
            {
                "APP_MODE": "cluster",
                "DB_PASSWORD": "pw",
                "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                "HOSTNAME": "web-1",
                "LANG": "C",
                "KUBECONFIG": None,
            },
        ),
        (
            EnvChoice(exclude=("DB_*", "KUBECONFIG", "HOSTNAME")),
            {"APP_MODE": "cluster", "KUBERNETES_SERVICE_HOST": "10.96.0.1"},
        ),
        # Exclude wins over include.
        (
            EnvChoice(include=("*",), exclude=("PATH", "APP_*")),
            {
                "HOME": "/nonexistent",
                "LANG": "C",
                "DB_PASSWORD": "pw",
                "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                "HOSTNAME": "web-1",
                "KUBECONFIG": None,
            },
        ),
    ],
    ids=["default", "no-env", "include", "exclude", "include-all-exclude-some"],
)
def test_what_the_program_gets(choice: EnvChoice, expected_changes: dict[str, str | None]) -> None:
    expected = {**LOCAL, **{k: v for k, v in expected_changes.items() if v is not None}}
    for name, value in expected_changes.items():
        if value is None:
            del expected[name]
    assert program_env(LOCAL, POD, choice) == expected


def test_machine_variables_are_documented() -> None:
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "kubernetes.md").read_text()
    for name in MACHINE_VARIABLES:
        assert f"`{name}`" in doc, name


@pytest.mark.parametrize(
    "value",
    ["plain", "", "with space", "it's", 'say "hi"', "a\nb", "$HOME and ${HOME} and $(X)", "back\\slash", "tab\tend"],
)
def test_dotenv_values_read_back_by_a_shell(value: str) -> None:
    """The dotenv quoting, read back by a POSIX shell (``set -a; . file``) for the values a shell reads
    the same way (no newline inside double quotes, where dotenv and sh differ)."""
    line = f"V={dotenv_value(value)}"
    if "\n" in value:
        assert line == 'V="a\\nb"'
        return
    out = subprocess.run(["sh", "-c", f'{line}\nprintf %s "$V"'], capture_output=True, text=True, check=True)
    assert out.stdout == value


def test_render_formats() -> None:
    result = overlay({"B": "two words", "A": "1"}, EnvChoice())
    assert render(result, "dotenv") == "A=1\nB='two words'\n# not passed on from this machine: KUBECONFIG\n"
    assert json.loads(render(result, "json")) == {"A": "1", "B": "two words"}
