"""scripts/bench: what ktrace costs a program, each figure next to its baseline from the same run.

    scripts/bench [--quick] [--out DIR] [--only ID[,ID...]] [--ktrace PATH] [--backends ptrace,notify]

Sets up the tests' namespace cluster (agent on a Unix socket in the cluster namespace, programs
on the laptop side), the benchmark server and the proxychains-ng peer, measures every figure
(medians of several runs, interleaved with the baseline), prints a markdown table and writes
DIR/bench.md and DIR/bench.json. ``--quick`` takes a few iterations (CI keeps it working);
timings are never pass/fail: the exit status is 0 when every figure was measured, whatever the
numbers, and 1 when a measurement itself failed. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_env import BenchEnv, BenchError, agent_of, load_text, machine_info, unwind_on_termination
from bench_figures import FIGURES, FULL, QUICK
from bench_report import FIGURE_IDS, Figure, markdown, report_json
from fixture_programs import Programs
from nscluster import ClusterError, _tool, unavailable_reason


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few iterations (CI): checks the benchmark runs")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="where bench.md and bench.json go")
    p.add_argument("--only", metavar="IDS", help=f"comma-separated figure ids: {', '.join(FIGURE_IDS)}")
    p.add_argument(
        "--ktrace", metavar="PATH", help="the ktrace to measure, with the ktrace-agent beside it (default: installed)"
    )
    p.add_argument(
        "--backends",
        default="ptrace,notify",
        metavar="LIST",
        help="interception backends to measure, each figure once per backend in turn (default: ptrace,notify)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"scripts/bench: {reason}", file=sys.stderr)
        return 2
    ids = FIGURE_IDS if not args.only else tuple(args.only.split(","))
    unknown = [i for i in ids if i not in FIGURES]
    if unknown:
        print(f"scripts/bench: unknown figure(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    backends = [b for b in args.backends.split(",") if b]
    if not backends or any(b not in ("ptrace", "notify") for b in backends):
        print("scripts/bench: --backends takes ptrace and/or notify", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    sizes = QUICK if args.quick else FULL
    machine = machine_info()
    ktrace = args.ktrace or _tool("ktrace")
    agent = agent_of(args.ktrace)
    programs = Programs()
    for name in ("csysloop", "cbenchsrv", "cnetbench"):
        programs[name]  # build (or find in the cache) before anything is timed
    figures: list[Figure] = []
    started = time.monotonic()
    unwind_on_termination()  # the namespace cluster, its servers and the peers are torn down
    try:
        with BenchEnv.up(programs, ktrace) as env:
            for fid, backend in ((fid, backend) for fid in ids for backend in backends):
                t0 = time.monotonic()
                env.cluster.backend = backend
                fig = FIGURES[fid](env, sizes)
                fig.id, fig.title = f"{fid}[{backend}]", f"{fig.title} ({backend})"
                figures.append(fig)
                print(
                    f"[{time.monotonic() - t0:5.1f}s] {fig.id}: value {fig.value} baseline {fig.baseline} "
                    f"met {fig.met} load {load_text()}{' ERRORS ' + str(fig.errors) if fig.errors else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    except (BenchError, ClusterError) as exc:
        print(f"scripts/bench: {exc}", file=sys.stderr)
        return 1
    machine["load_after"] = load_text()
    machine["duration_s"] = round(time.monotonic() - started, 1)
    machine["ktrace"] = ktrace
    machine["backends"] = ",".join(backends)
    machine["agent"] = agent
    git = subprocess.run(
        ["git", "-C", str(pathlib.Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    machine["commit"] = git.stdout.strip() or "?"
    table = markdown(figures, machine, mode)
    os.makedirs(args.out, exist_ok=True)
    pathlib.Path(args.out, "bench.md").write_text(table)
    pathlib.Path(args.out, "bench.json").write_text(json.dumps(report_json(figures, machine, mode), indent=2) + "\n")
    print(table)
    return 1 if any(fig.errors for fig in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
