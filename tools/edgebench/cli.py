"""tools/bench SCENARIO|all|report [--quick] [--runs N]."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from edgebench import report
from edgebench.common import RESULTS_DIR, BenchError, Result, machine_info

# scenario -> (module name, runs, runs with --quick); imported lazily (bcc is slow to import)
SCENARIOS: dict[str, tuple[int, int]] = {
    "xdp": (5, 3),
    "tcp": (3, 2),
    "http": (3, 1),
    "scale": (1, 1),
    "scrape": (5, 3),
    "h1core": (5, 3),
}


def _runner(name: str) -> Callable[[Result, int, bool], None]:
    if name == "xdp":
        from edgebench import xdp

        def run_xdp(r: Result, runs: int, quick: bool) -> None:
            xdp.measure(r, runs, calls=100_000)

        return run_xdp
    if name == "tcp":
        from edgebench import tcp

        return tcp.measure
    if name == "http":
        from edgebench import http

        return http.measure
    if name == "scale":
        from edgebench import scale

        return scale.measure
    if name == "scrape":
        from edgebench import scrape

        return scrape.measure
    if name == "h1core":
        from edgebench import h1core

        return h1core.measure
    raise SystemExit(f"unknown scenario {name}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    p.add_argument("scenario", choices=[*SCENARIOS, "all", "report"])
    p.add_argument("--quick", action="store_true", help="fewer runs, shorter runs (smoke check)")
    p.add_argument("--runs", type=int, help="runs per measurement (default per scenario)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--no-report", action="store_true",
                   help="do not rewrite docs/BENCHMARKS.md afterwards")
    return p


def run_scenario(name: str, quick: bool, runs: int | None, out: Path, command: str) -> Result:
    full, fast = SCENARIOS[name]
    n = runs if runs is not None else (fast if quick else full)
    result = Result(scenario=name, command=command, quick=quick, runs=n,
                    started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    machine=machine_info())
    print(f"[bench] {name}: {n} runs{' (quick)' if quick else ''}", flush=True)
    t0 = time.monotonic()
    try:
        _runner(name)(result, n, quick)
    except BenchError as exc:
        result.skipped = str(exc)
        print(f"[bench] {name}: not measured: {exc}", file=sys.stderr, flush=True)
    result.duration_s = round(time.monotonic() - t0, 1)
    result.loadavg_at_end = [round(x, 2) for x in os.getloadavg()]
    path = result.write(out)
    print(report.text_table(result.to_json()), flush=True)
    print(f"[bench] {name}: {result.duration_s:.0f}s, wrote {path}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = "tools/bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.scenario == "report":
        path = report.write_page(args.out)
        print(f"[bench] wrote {path}")
        return 0
    if os.geteuid() != 0:
        print("tools/bench: run as root (BPF programs, network namespaces)", file=sys.stderr)
        return 1
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    failed = 0
    for name in names:
        try:
            r = run_scenario(name, args.quick, args.runs, args.out, command)
            failed += r.skipped is not None and name in ("xdp", "tcp", "http")
        except Exception:  # one scenario's crash must not stop the others
            traceback.print_exc()
            failed += 1
    if not args.no_report:
        print(f"[bench] wrote {report.write_page(args.out)}")
    return 1 if failed else 0
