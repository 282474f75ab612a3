"""``ktrace doctor``: can ktrace work here, and if not, why and what to do.

One line per check: ``ok``, ``warn`` or ``FAIL``, what was found, and a fix.
The exit status is 1 when any check failed.

The local checks do the real thing rather than guess from versions: the ptrace
check starts a small program under ktrace's own launcher and tracer, with a
seccomp filter, and takes the same steps as ``ktrace run`` (PTRACE_SEIZE, the
seccomp stop at connect(), process_vm_readv, pidfd_getfd). When a step fails,
the cause is diagnosed from what the kernel exposes (Yama's ptrace_scope, the
seccomp filters and capabilities of ktrace's own process).

Other parts of ktrace add checks with ``register`` or, to stay import-free until
needed, by naming ``module:function`` in ``PLUGIN_CHECKS`` (the Kubernetes
context and RBAC checks). A check takes the settings and returns results.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import importlib
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ktrace import config
from ktrace.errors import KtraceError
from ktrace.tracer import launcher, linux, seccomp, sockaddr, syscalls
from ktrace.tracer.ptrace import kernel
from ktrace.tracer.ptrace.loop import FORWARDED_SIGNALS, Tracer
from ktrace.tracer.tracee import Outcome, Resume, Tracee

PTRACE_CAP = 19  # CAP_SYS_PTRACE
MIN_KERNEL = (5, 6)  # pidfd_getfd
PROBE_TIMEOUT = 20.0


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.status.value:<5} {self.name:<10} {self.detail}"
        if self.fix and self.status is not Status.OK:
            text += f" (fix: {self.fix})"
        return text


Check = Callable[[config.Settings], Iterable[CheckResult]]
CHECKS: list[Check] = []
PLUGIN_CHECKS: list[str] = ["ktrace.kube.doctor:checks"]


def register(check: Check) -> Check:
    CHECKS.append(check)
    return check


# -- what the kernel says about this process (pure parsing) ------------------------------


@dataclass(frozen=True)
class ProcessFacts:
    seccomp_mode: int = 0  # 0 none, 1 strict, 2 filter
    seccomp_filters: int = 0
    no_new_privs: bool = False
    cap_sys_ptrace: bool = False
    yama_scope: int | None = None  # None: no Yama LSM

    @classmethod
    def parse(cls, status_text: str, yama_text: str | None) -> ProcessFacts:
        values: dict[str, str] = {}
        for line in status_text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                values[key.strip()] = value.strip()
        cap_eff = int(values.get("CapEff", "0"), 16)
        yama = int(yama_text.strip()) if yama_text and yama_text.strip().isdigit() else None
        return cls(
            seccomp_mode=int(values.get("Seccomp", "0") or 0),
            seccomp_filters=int(values.get("Seccomp_filters", "0") or 0),
            no_new_privs=values.get("NoNewPrivs", "0") == "1",
            cap_sys_ptrace=bool(cap_eff >> PTRACE_CAP & 1),
            yama_scope=yama,
        )

    @classmethod
    def here(cls) -> ProcessFacts:
        with open("/proc/self/status", encoding="utf-8") as f:
            status = f.read()
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope", encoding="utf-8") as f:
                yama: str | None = f.read()
        except OSError:
            yama = None
        return cls.parse(status, yama)


def explain_ptrace_denied(facts: ProcessFacts, err: int) -> tuple[str, str]:
    """Why PTRACE_SEIZE of ktrace's own child failed, and the fix."""
    if facts.yama_scope == 3:
        return (
            "Yama ptrace_scope is 3: ptrace is disabled on this machine until reboot",
            "set kernel.yama.ptrace_scope to 0 or 1 at boot (sysctl.d), then reboot",
        )
    if facts.yama_scope == 2 and not facts.cap_sys_ptrace:
        return (
            "Yama ptrace_scope is 2: only processes with CAP_SYS_PTRACE may trace",
            "sysctl kernel.yama.ptrace_scope=1 (as root), or give ktrace CAP_SYS_PTRACE",
        )
    if facts.seccomp_filters or facts.seccomp_mode == 2:
        count = facts.seccomp_filters or "a"
        return (
            f"ktrace runs under {count} seccomp filter(s) that deny ptrace: a container's seccomp profile",
            "run the container with a seccomp profile that allows ptrace (docker/podman: "
            "--security-opt seccomp=unconfined or --cap-add SYS_PTRACE; Kubernetes: "
            "securityContext.seccompProfile.type: Unconfined)",
        )
    if err == errno.EPERM:
        return (
            "denied by a security module (AppArmor/SELinux policy) or a container runtime",
            "allow ptrace for ktrace in the AppArmor/SELinux policy (e.g. docker --security-opt apparmor=unconfined)",
        )
    return os.strerror(err), "run ktrace directly on the host, outside restricted sandboxes"


# -- local checks ------------------------------------------------------------------------


def kernel_version(release: str) -> tuple[int, int] | None:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "0")
    except (IndexError, ValueError):
        return None


@register
def check_kernel(settings: config.Settings) -> Iterable[CheckResult]:
    release, machine = platform.release(), platform.machine()
    if sys.platform != "linux":
        yield CheckResult("kernel", Status.FAIL, f"{sys.platform}: ktrace needs Linux", "run it on Linux")
        return
    if machine != "x86_64":
        yield CheckResult("kernel", Status.FAIL, f"{machine}: only x86_64 is supported", "run it on x86_64")
        return
    version = kernel_version(release)
    if version is None or version < MIN_KERNEL:
        yield CheckResult(
            "kernel",
            Status.FAIL,
            f"Linux {release}: ktrace needs 5.6 or later (pidfd_getfd)",
            "upgrade the kernel",
        )
        return
    yield CheckResult("kernel", Status.OK, f"Linux {release} {machine} (5.6+: pidfd_getfd, seccomp RET_TRACE)")


@register
def check_yama(settings: config.Settings) -> Iterable[CheckResult]:
    facts = ProcessFacts.here()
    scope = facts.yama_scope
    if scope is None:
        yield CheckResult("yama", Status.OK, "no Yama LSM: ptrace limited only by ownership")
    elif scope in (0, 1):
        yield CheckResult("yama", Status.OK, f"ptrace_scope {scope}: a process may trace its own children")
    elif scope == 2 and facts.cap_sys_ptrace:
        yield CheckResult("yama", Status.OK, "ptrace_scope 2, and ktrace has CAP_SYS_PTRACE")
    else:
        detail, fix = explain_ptrace_denied(facts, errno.EPERM)
        yield CheckResult("yama", Status.FAIL, detail, fix)


def _in_child(action: Callable[[], None]) -> int:
    """Run ``action`` in a forked child; 0 if it returned, else the errno it raised."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            action()
        except OSError as exc:
            code = exc.errno or errno.EIO
        except BaseException:
            code = errno.EIO
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@register
def check_seccomp(settings: config.Settings) -> Iterable[CheckResult]:
    facts = ProcessFacts.here()
    own = f"; ktrace itself runs under {facts.seccomp_filters} seccomp filter(s)" if facts.seccomp_filters else ""

    def install() -> None:
        linux.prepare_child_for_filter()
        linux.install_seccomp(seccomp.build([]))

    err = _in_child(install)
    if err == 0:
        yield CheckResult("seccomp", Status.OK, f"a process can install a seccomp filter (NO_NEW_PRIVS){own}")
        return
    if err == errno.EINVAL:
        detail = "the kernel has no seccomp filter support (CONFIG_SECCOMP_FILTER)"
        fix = "use a kernel built with CONFIG_SECCOMP_FILTER"
    elif err in (errno.EPERM, errno.EACCES):
        detail = f"installing a seccomp filter is denied ({errno.errorcode[err]}){own}"
        fix = "allow the seccomp() syscall in the container's seccomp profile"
    else:
        detail = f"installing a seccomp filter failed: {os.strerror(err)}"
        fix = "run ktrace directly on the host"
    yield CheckResult("seccomp", Status.FAIL, detail, fix)


@dataclass
class _Probe:
    """The syscall handler of the probe program: looks at its connect() like ktrace would."""

    stops: int = 0
    read_ok: bool = False
    getfd_ok: bool = False
    errors: dict[str, str] = field(default_factory=dict)

    def on_syscall(self, t: Tracee) -> Outcome:
        if t.syscall == "connect":
            self.stops += 1
            try:
                raw = t.read(t.arg(1), min(t.arg(2), sockaddr.MAX_SOCKADDR_LEN))
                self.read_ok = isinstance(sockaddr.decode(raw), sockaddr.InetAddr)
            except OSError as exc:
                self.errors["process_vm_readv"] = os.strerror(exc.errno or errno.EIO)
            try:
                os.close(t.duplicate(t.arg(0)))
                self.getfd_ok = True
            except OSError as exc:
                self.errors["pidfd_getfd"] = os.strerror(exc.errno or errno.EIO)
        return Resume()

    def on_exec(self, tid: int) -> None:
        pass

    def on_thread_exit(self, tid: int) -> None:
        pass


PROBE_PROGRAM = "import socket; socket.socket().connect_ex(('127.0.0.1', 9))"


@register
def check_ptrace(settings: config.Settings) -> Iterable[CheckResult]:
    argv = [sys.executable, "-I", "-S", "-c", PROBE_PROGRAM]
    connect = syscalls.number("connect")
    assert connect is not None
    rules = [seccomp.trace(connect)]
    blocked = {signal.SIGCHLD, *FORWARDED_SIGNALS}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    child = launcher.fork_child(argv[0], argv, dict(os.environ), seccomp.build(rules))
    try:
        try:
            kernel.seize(child.pid)
        except OSError as exc:
            launcher.abort(child)
            err = exc.errno or errno.EPERM
            detail, fix = explain_ptrace_denied(ProcessFacts.here(), err)
            yield CheckResult(
                "ptrace", Status.FAIL, f"PTRACE_SEIZE failed ({errno.errorcode.get(err, err)}): {detail}", fix
            )
            return
        try:
            launcher.release(child, "the probe program")
        except launcher.LaunchError as exc:
            yield CheckResult(
                "ptrace",
                Status.FAIL,
                f"the probe program could not start under a seccomp filter: {exc}",
                "see the seccomp check",
            )
            return
        probe = _Probe()

        async def trace() -> int | None:
            tracer = Tracer(probe, child.pid, asyncio.get_running_loop())
            tracer.start()
            assert tracer.finished is not None
            try:
                result = await asyncio.wait_for(tracer.finished, PROBE_TIMEOUT)
            except TimeoutError:
                tracer.kill_all()
                return None
            finally:
                tracer.close()
            return result.exit_code

        exit_code = asyncio.run(trace())
    finally:
        launcher.reap(child)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    yield from _probe_results(probe, exit_code)


@register
def check_notify(settings: config.Settings) -> Iterable[CheckResult]:
    """The notify backend (seccomp user notification): the same probe, supervised instead of traced,
    and which backend `--backend auto` picks here."""
    from ktrace.tracer import backends
    from ktrace.tracer.notify.loop import Supervisor

    missing = backends.notify_missing()
    if missing is not None:
        yield CheckResult(
            "notify", Status.WARN, f"the notify backend cannot run here: {missing}", "use --backend ptrace"
        )
    else:
        argv = [sys.executable, "-I", "-S", "-c", PROBE_PROGRAM]
        connect = syscalls.number("connect")
        assert connect is not None
        program = seccomp.build([seccomp.trace(connect)], stop=seccomp.RET_USER_NOTIF)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *FORWARDED_SIGNALS})
        probe = _Probe()
        exit_code: int | None = None
        try:
            child = launcher.fork_child(argv[0], argv, dict(os.environ), program, notify=True)
            try:
                launcher.release(child, "the probe program")

                async def supervise() -> int | None:
                    supervisor = Supervisor(probe, child, asyncio.get_running_loop())
                    supervisor.start()
                    assert supervisor.finished is not None
                    try:
                        result = await asyncio.wait_for(supervisor.finished, PROBE_TIMEOUT)
                    except TimeoutError:
                        supervisor.kill_all()
                        return None
                    finally:
                        supervisor.close()
                    return result.exit_code

                exit_code = asyncio.run(supervise())
            finally:
                launcher.reap(child)
        except (OSError, launcher.LaunchError) as exc:
            yield CheckResult(
                "notify", Status.WARN, f"the notify backend failed its probe: {exc}", "use --backend ptrace"
            )
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if exit_code is None or probe.stops == 0:
            yield CheckResult(
                "notify",
                Status.WARN,
                "the probe's connect() did not reach ktrace through a seccomp listener",
                "use --backend ptrace",
            )
        else:
            yield CheckResult("notify", Status.OK, "supervised a probe program: seccomp user notification at connect()")
    try:
        picked = backends.choose("auto")
    except ValueError:
        picked = "ptrace"
    debuggers = "a debugger can run under it" if picked == "notify" else "use --backend notify to run a debugger"
    yield CheckResult("backend", Status.OK, f"--backend auto uses {picked} here ({debuggers})")


def _probe_results(probe: _Probe, exit_code: int | None) -> Iterable[CheckResult]:
    if exit_code is None:
        yield CheckResult("ptrace", Status.FAIL, "the traced probe program did not finish", "run ktrace doctor --debug")
        return
    if probe.stops == 0:
        yield CheckResult(
            "ptrace",
            Status.FAIL,
            "the probe's connect() never stopped: seccomp RET_TRACE does not reach the tracer",
            "run ktrace directly on the host, outside nested sandboxes (gVisor does not support it)",
        )
        return
    yield CheckResult("ptrace", Status.OK, "traced a probe program: PTRACE_SEIZE and a seccomp stop at connect()")
    if probe.read_ok:
        yield CheckResult("vm_readv", Status.OK, "process_vm_readv reads the program's memory")
    else:
        reason = probe.errors.get("process_vm_readv", "the address did not decode")
        yield CheckResult("vm_readv", Status.FAIL, f"process_vm_readv failed: {reason}", "see the yama check")
    if probe.getfd_ok:
        yield CheckResult("pidfd", Status.OK, "pidfd_getfd duplicates the program's sockets")
    else:
        reason = probe.errors.get("pidfd_getfd", "unknown")
        yield CheckResult("pidfd", Status.FAIL, f"pidfd_getfd failed: {reason}", "ktrace needs Linux 5.6 or later")


# -- running them ------------------------------------------------------------------------


def _plugin_checks() -> list[Check]:
    found: list[Check] = []
    for spec in PLUGIN_CHECKS:
        module_name, _, function = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # not part of this build
            raise
        found.append(getattr(module, function))
    return found


def run_checks(settings: config.Settings) -> list[CheckResult]:
    results: list[CheckResult] = []
    for check in [*CHECKS, *_plugin_checks()]:
        name = getattr(check, "__name__", "check").removeprefix("check_")
        try:
            results.extend(check(settings))
        except Exception as exc:  # one broken check must not hide the others
            results.append(CheckResult(name, Status.FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    return results


def run_doctor(config_file: str | None) -> int:
    _plugin_checks()  # importing a plugin registers its settings, which ktrace.toml may use
    try:
        settings = config.load({}, os.environ, os.getcwd(), config_file)
    except config.ConfigError as exc:
        raise KtraceError(str(exc), "see docs/configuration.md") from None
    results = run_checks(settings)
    for result in results:
        print(result.line(), flush=True)
    failed = [r for r in results if r.status is Status.FAIL]
    if failed:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
        return 1
    return 0
