"""Settings precedence (flags > environment > ktrace.toml > defaults) and errors that name the key (pure)."""

from __future__ import annotations

import pathlib
import re

import pytest

from ktrace import config
from ktrace.errors import KtraceError
from ktrace.options import run_options
from ktrace.report.render import Verbosity
from ktrace.rules import Route


def write(tmp: pathlib.Path, text: str, name: str = "ktrace.toml") -> pathlib.Path:
    path = tmp / name
    path.write_text(text)
    return path


def test_defaults_without_anything(tmp_path: pathlib.Path) -> None:
    options = run_options({}, ["true"], env={}, cwd=str(tmp_path))
    assert options.agent is None and options.connect_timeout is None and options.hosts == "local"
    assert options.rules.rules == () and options.verbosity is Verbosity.FAILURES and options.log_json is None


def test_precedence_key_by_key(tmp_path: pathlib.Path) -> None:
    write(tmp_path, 'agent = "unix:/file.sock"\nconnect-timeout = 3\nhosts = "cluster"\noutput = "all"\n')
    env = {"KTRACE_CONNECT_TIMEOUT": "4.5", "KTRACE_OUTPUT": "quiet", "KTRACE_BIN": "/not/a/setting"}
    options = run_options({"output": "all"}, ["true"], env=env, cwd=str(tmp_path))
    assert options.agent == "unix:/file.sock"  # file
    assert options.connect_timeout == 4.5  # env over file
    assert options.hosts == "cluster"  # file over default
    assert options.verbosity is Verbosity.ALL  # flag over env


def test_lists_are_replaced_not_merged_and_rules_keep_their_source(tmp_path: pathlib.Path) -> None:
    write(tmp_path, 'local = ["10.0.0.0/8", "db.corp"]\nremote = ["10.96.0.0/12"]\n')
    options = run_options({}, ["true"], env={"KTRACE_LOCAL": "192.168.0.0/16, *.corp"}, cwd=str(tmp_path))
    rules = {(r.text, r.route, r.source) for r in options.rules.rules}
    assert rules == {
        ("192.168.0.0/16", Route.LOCAL, "KTRACE_LOCAL"),
        ("*.corp", Route.LOCAL, "KTRACE_LOCAL"),
        ("10.96.0.0/12", Route.REMOTE, "ktrace.toml"),
    }
    flagged = run_options({"local": ["172.16.0.0/12"]}, ["true"], env={}, cwd=str(tmp_path))
    assert [(r.text, r.source) for r in flagged.rules.rules if r.route is Route.LOCAL] == [("172.16.0.0/12", "--local")]


def test_explicit_file_and_env_file(tmp_path: pathlib.Path) -> None:
    write(tmp_path, 'agent = "unix:/cwd.sock"\n')
    other = write(tmp_path, 'agent = "unix:/other.sock"\n', "other.toml")
    assert run_options({"config": str(other)}, ["x"], env={}, cwd=str(tmp_path)).agent == "unix:/other.sock"
    assert run_options({}, ["x"], env={"KTRACE_CONFIG": str(other)}, cwd=str(tmp_path)).agent == "unix:/other.sock"
    with pytest.raises(KtraceError, match=re.escape("config file /nonexistent.toml does not exist")):
        run_options({"config": "/nonexistent.toml"}, ["x"], env={}, cwd=str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("conect-timeout = 5\n", "unknown key 'conect-timeout' (did you mean 'connect-timeout'?)"),
        ("connect_timeout = 5\n", "unknown key 'connect_timeout' (did you mean 'connect-timeout'?)"),
        ("zzz = 1\n", "unknown key 'zzz' (known keys: agent, "),
        ("[run]\nagent = 'x'\n", "unknown key 'run'"),
        ("connect-timeout = -1\n", "connect-timeout must be a positive number, not -1"),
        ("connect-timeout = true\n", "connect-timeout must be a positive number, not True"),
        ("local = [1, 2]\n", "local must be a list of strings"),
        ("hosts = 'pod'\n", "hosts must be one of local, cluster, not 'pod'"),
        ("output = 'loud'\n", "output must be one of quiet, failures, all"),
        ("agent = \n", "not valid TOML"),
    ],
)
def test_file_errors_name_the_key(tmp_path: pathlib.Path, text: str, message: str) -> None:
    write(tmp_path, text)
    with pytest.raises(KtraceError) as info:
        run_options({}, ["true"], env={}, cwd=str(tmp_path))
    assert message in info.value.message and info.value.exit_code == 125


def test_env_errors_name_the_variable(tmp_path: pathlib.Path) -> None:
    with pytest.raises(KtraceError, match="KTRACE_CONNECT_TIMEOUT must be a positive number, not 'soon'"):
        run_options({}, ["true"], env={"KTRACE_CONNECT_TIMEOUT": "soon"}, cwd=str(tmp_path))


def test_bad_rules_name_their_source(tmp_path: pathlib.Path) -> None:
    write(tmp_path, 'remote = ["10.0.0.1/8"]\n')
    with pytest.raises(
        KtraceError, match=re.escape("bad rule for remote in ktrace.toml: '10.0.0.1/8' has host bits set")
    ):
        run_options({}, ["true"], env={}, cwd=str(tmp_path))
    with pytest.raises(
        KtraceError, match=re.escape("bad rule for --local: bad host name 'db..corp' in rule 'tcp://db..corp'")
    ):
        run_options({"local": ["tcp://db..corp"]}, ["true"], env={}, cwd=str(tmp_path))
    with pytest.raises(KtraceError, match="both a local and a remote rule"):
        run_options({"local": ["10.0.0.0/8"], "remote": ["10.0.0.0/8"]}, ["true"], env={}, cwd=str(tmp_path))


def test_other_modules_can_register_keys(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "KEYS", dict(config.KEYS))
    config.register(config.Key("namespace", config.text, "the namespace"))
    write(tmp_path, 'namespace = "shop"\n')
    settings = config.load({}, {"KTRACE_NAMESPACE": "payments"}, str(tmp_path))
    assert settings.get("namespace") == "payments" and settings.source("namespace") == "KTRACE_NAMESPACE"
    assert settings.file == str(tmp_path / "ktrace.toml")


def test_dns_cache_is_on_unless_a_flag_variable_or_the_file_turns_it_off(tmp_path: pathlib.Path) -> None:
    from ktrace.cli import build_parser

    assert run_options({}, ["true"], env={}, cwd=str(tmp_path)).dns_cache is True
    flags = vars(build_parser().parse_args(["run", "--no-dns-cache"]))
    assert run_options(flags, ["true"], env={}, cwd=str(tmp_path)).dns_cache is False
    for value, expected in (("0", False), ("false", False), ("no", False), ("1", True), ("on", True)):
        assert run_options({}, ["true"], env={"KTRACE_DNS_CACHE": value}, cwd=str(tmp_path)).dns_cache is expected
    write(tmp_path, "dns-cache = false\n")
    assert run_options({}, ["true"], env={}, cwd=str(tmp_path)).dns_cache is False
    assert run_options({}, ["true"], env={"KTRACE_DNS_CACHE": "true"}, cwd=str(tmp_path)).dns_cache is True
    flags = vars(build_parser().parse_args(["run", "--dns-cache"]))
    assert run_options(flags, ["true"], env={"KTRACE_DNS_CACHE": "0"}, cwd=str(tmp_path)).dns_cache is True
    write(tmp_path, 'dns-cache = "sometimes"\n')
    with pytest.raises(KtraceError, match=re.escape("dns-cache must be true or false")):
        run_options({}, ["true"], env={}, cwd=str(tmp_path))
