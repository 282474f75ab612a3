"""The Kubernetes settings (flags, KTRACE_* variables, ktrace.toml → KubeOptions) and small session rules (pure)."""

from __future__ import annotations

import pathlib

import pytest

from ktrace import __version__, config
from ktrace.errors import KtraceError
from ktrace.kube.envlayer import EnvChoice
from ktrace.kube.options import (
    ClusterChoice,
    cluster_choice,
    ignored_for_target,
    ignored_without_target,
    kube_options,
)
from ktrace.kube.session import heartbeat_interval, version_warning
from ktrace.kube.spec import DEFAULT_IMAGE
from ktrace.kube.target import Target


def settings(flags: dict[str, object], env: dict[str, str] | None = None, cwd: str = "/nonexistent") -> config.Settings:
    return config.load(flags, env or {}, cwd)


def test_defaults() -> None:
    options = kube_options(settings({}))
    assert options is not None
    assert options.cluster == ClusterChoice()
    assert options.target is None
    assert options.agent.image == DEFAULT_IMAGE
    assert options.agent.idle_exit == 60
    assert options.timeout == 60
    assert options.port_forward == "auto"


def test_port_forward_from_flag_environment_and_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ktrace.toml").write_text('port-forward = "WebSocket"\n')
    from_file = kube_options(settings({}, cwd=str(tmp_path)))
    from_env = kube_options(settings({}, {"KTRACE_PORT_FORWARD": "spdy"}, cwd=str(tmp_path)))
    from_flag = kube_options(settings({"port-forward": "auto"}, {"KTRACE_PORT_FORWARD": "spdy"}, cwd=str(tmp_path)))
    assert [o.port_forward if o else None for o in (from_file, from_env, from_flag)] == ["websocket", "spdy", "auto"]
    with pytest.raises(config.ConfigError, match="KTRACE_PORT_FORWARD must be one of auto, spdy, websocket"):
        kube_options(settings({}, {"KTRACE_PORT_FORWARD": "http2"}))


def test_flags_environment_and_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ktrace.toml").write_text(
        'namespace = "from-file"\nagent-toleration = ["gpu:NoSchedule"]\nagent-pull-policy = "ifnotpresent"\n'
    )
    loaded = settings(
        {"context": "dev", "agent-timeout": 5.0, "target": "deploy/api"},
        {"KTRACE_AGENT_IMAGE": "registry.example/agent:1", "KTRACE_AGENT_LABEL": "team=a,tier=dev"},
        str(tmp_path),
    )
    options = kube_options(loaded)
    assert options is not None
    assert options.cluster == ClusterChoice(None, "dev", "from-file")
    assert options.target == Target("deployment", "api")
    assert options.agent.image == "registry.example/agent:1"
    assert options.agent.pull_policy == "IfNotPresent"
    assert options.agent.labels == {"team": "a", "tier": "dev"}
    assert options.agent.tolerations == ({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},)
    assert options.timeout == 5.0
    assert ignored_for_target(options) == ["--agent-toleration", "--agent-label"]
    assert cluster_choice(loaded) == options.cluster


def test_other_agents_take_no_kube_options() -> None:
    assert kube_options(settings({"agent": "local"})) is None
    with pytest.raises(KtraceError, match="--target needs --agent kube") as raised:
        kube_options(settings({"agent": "unix:/a.sock", "target": "pod/x"}))
    assert raised.value.exit_code == 125


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"target": "svc/x"}, "--target 'svc/x'"),
        ({"agent-node-selector": ["novalue"]}, "--agent-node-selector: expected KEY=VALUE"),
        ({"agent-toleration": ["k:Sometimes"]}, "--agent-toleration: effect 'Sometimes'"),
    ],
)
def test_bad_settings_are_usage_errors(flags: dict[str, object], message: str) -> None:
    with pytest.raises(KtraceError) as raised:
        kube_options(settings(flags))
    assert message in raised.value.message
    assert raised.value.exit_code == 125


def test_pull_policy_from_environment_is_checked() -> None:
    with pytest.raises(config.ConfigError, match="KTRACE_AGENT_PULL_POLICY must be one of Always, IfNotPresent"):
        settings({}, {"KTRACE_AGENT_PULL_POLICY": "sometimes"})


def test_version_warning() -> None:
    assert version_warning(__version__) is None
    warning = version_warning("0.0.1")
    assert warning is not None
    assert warning.startswith("warning: the agent is ktrace-agent 0.0.1, this is ktrace ")
    assert f"tag {__version__}" in warning


def test_heartbeat_interval_leaves_room_for_missed_beats() -> None:
    assert heartbeat_interval(60) == 10
    assert heartbeat_interval(8) == 2
    assert heartbeat_interval(0.1) == 0.2
    for idle in (0.5, 3, 30, 600):
        assert heartbeat_interval(idle) * 2 < idle or idle < 1


def test_target_environment_and_path_options(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ktrace.toml").write_text('env-exclude = ["DB_*"]\nno-env = false\nlocal-path = ["/etc/app/local"]\n')
    loaded = settings(
        {"target": "deploy/api", "env-include": ["LANG"], "remote-path": ["/etc/ssl"]},
        {"KTRACE_ENV_EXCLUDE": "SECRET_*,TOKEN"},
        str(tmp_path),
    )
    options = kube_options(loaded)
    assert options is not None
    assert options.env == EnvChoice(use_pod=True, include=("LANG",), exclude=("SECRET_*", "TOKEN"))
    assert options.remote_paths == ("/etc/ssl",) and options.local_paths == ("/etc/app/local",)
    assert ignored_without_target(options) == []
    off = kube_options(settings({"target": "pod/x"}, {"KTRACE_NO_ENV": "1"}))
    assert off is not None and not off.env.use_pod
    without = kube_options(settings({"env-include": ["X"], "no-env": True, "local-path": ["/a"]}))
    assert without is not None
    assert ignored_without_target(without) == ["--no-env", "--env-include", "--local-path"]


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"target": "pod/x", "remote-path": ["etc/ssl"]}, {}, "--remote-path: 'etc/ssl' is not an absolute path"),
        ({"target": "pod/x"}, {"KTRACE_NO_ENV": "maybe"}, "KTRACE_NO_ENV must be true or false"),
    ],
)
def test_bad_target_options(flags: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises((KtraceError, config.ConfigError), match=message):
        kube_options(settings(flags, env))


def test_ktrace_env_needs_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    from ktrace.cli import main

    assert main(["env", "--format", "json"]) == 125
    assert capsys.readouterr().err == "ktrace: ktrace env needs --target (hint: e.g. ktrace env --target deploy/NAME)\n"
