"""Command line: ``python -m ms2m`` (or ``ms2m``).

ms2m compare [--runs N] [--rate R] ...   migrate with each strategy, print the comparison
ms2m summarize DIR                        summarize a folder of reports
ms2m conformance --image I | --command ... check an implementation of the wire contract
ms2m soak --migrations N [--seed S] ...   a resumable chain of migrations with faults
ms2m cleanup [--all]                      remove containers and processes left by crashed runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import _native
from .defaults import MIGRATION_DEFAULTS
from .experiment import Comparison, compare_strategies, describe, format_table, summarize
from .links import parse_host_links, parse_pair_links
from .matrix import PAPER_RATES, PAPER_STRATEGIES, format_matrix, paper_grid, table
from .report import load_reports
from .sweeps import WARMUP_S, run_grid
from .testbed import RUNTIMES, TRANSFERS


def _until_ci_option(p: argparse.ArgumentParser, cap: str, what: str) -> None:
    p.add_argument(
        "--until-ci",
        type=float,
        default=None,
        metavar="FRACTION",
        help="repeat until the median downtime's 95%% confidence interval is within FRACTION of "
        "the median (0.05: 5%%)",
    )
    p.add_argument(cap, type=int, default=30, help=f"with --until-ci, the most {what} (30)")


def _compare(args: argparse.Namespace) -> int:
    params = Comparison(
        strategies=tuple(args.strategies),
        runs=args.runs,
        rate=args.rate,
        processing_ms=args.processing_ms,
        state_bytes=args.state_bytes,
        prefetch=args.prefetch,
        message_bytes=args.message_bytes,
        warmup_s=args.warmup_s,
        settle_s=args.settle_s,
        runtime=args.runtime,
        links=parse_host_links(args.link),
        transfer=args.transfer,
        host_links=parse_pair_links(args.host_link),
        until_ci=args.until_ci,
        max_runs=args.max_runs,
    )
    params.validate()
    out = Path(args.out) if args.out else Path("results") / time.strftime("compare-%Y%m%d-%H%M%S")
    print(f"comparing strategies: {describe(params)}", file=sys.stderr)
    print(f"reports go to {out}/", file=sys.stderr)
    reports = compare_strategies(params, out_dir=out, amqp_url=args.amqp_url)
    print()
    print(format_table(summarize(reports, args.until_ci, args.max_runs)))
    bad = [r for r in reports if not r.valid]
    if bad:
        print(f"\n{len(bad)} run(s) broke an invariant: {[r.run_id for r in bad]}")
        return 1
    return 0


def _matrix(args: argparse.Namespace) -> int:
    grid = paper_grid(
        repetitions=args.repetitions,
        strategies=tuple(args.strategies),
        rates=tuple(args.rates),
        processing_ms=(args.processing_ms,),
        state_bytes=(args.state_bytes,),
        warmup_s=args.warmup_s,
        settle_s=args.settle_s,
        replay_timeout_s=args.replay_timeout_s,
        replay_max_s=args.replay_max_s,
        runtime=args.runtime,
        links=parse_host_links(args.link),
        transfer=(args.transfer,),
        host_links=parse_pair_links(args.host_link),
        until_ci=args.until_ci,
        max_repetitions=args.max_repetitions,
    )
    reports = run_grid(grid, args.out, amqp_url=args.amqp_url)
    print(format_matrix(table(reports, args.until_ci, args.max_repetitions)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .testbed_file import load, run

    reports = run(args.file, args.out)
    sweep = load(args.file).get("sweep", {})
    until_ci, cap = sweep.get("until_ci"), int(sweep.get("max_repetitions", 30))
    print(format_table(summarize(reports, until_ci, cap)))
    return 0 if all(r.valid for r in reports) else 1


def _summarize(args: argparse.Namespace) -> int:
    reports = load_reports(args.folder)
    if not reports:
        print(f"no ms2m reports under {args.folder}", file=sys.stderr)
        return 1
    # A sweep's folder says how far it was to repeat its cells.
    spec = Path(args.folder) / "sweep.json"
    held = json.loads(spec.read_text()) if spec.exists() else {}
    until_ci, cap = held.get("until_ci"), held.get("max_repetitions", 30)
    print(format_table(summarize(reports, until_ci, cap)))
    print()
    print(format_matrix(table(reports, until_ci, cap)))
    return 0


def _conformance(args: argparse.Namespace) -> int:
    from .testbed import Testbed

    if not (args.image or args.command):
        print("ms2m: conformance needs --image or --command (or both)", file=sys.stderr)
        return 2
    bad = [item for item in args.env if "=" not in item]
    if bad:
        print(f"ms2m: --env takes KEY=VALUE, got {bad}", file=sys.stderr)
        return 2
    env = dict(item.partition("=")[::2] for item in args.env)
    with Testbed(runtime=args.runtime) as tb:
        rules = tb.conformance(
            image=args.image,
            command=shlex.split(args.command) if args.command else None,
            env=env,
            processing_ms=args.processing_ms,
        )
    for r in rules:
        mark = "ok    " if r["passed"] else "BROKEN"
        print(f"{mark} {r['rule']}: {r['detail']}")
    broken = [r for r in rules if not r["passed"]]
    print(f"\n{len(rules) - len(broken)} of {len(rules)} rules kept")
    return 1 if broken else 0


def _soak(args: argparse.Namespace) -> int:
    from .soak import format_summary, soak

    out = args.out or f"results/soak-{args.seed}"
    summary = soak(
        out,
        migrations=args.migrations,
        seed=args.seed,
        fault_rate=args.fault_rate,
        strategies=args.strategies,
        rates=args.rates,
        runtime=args.runtime,
        kills=args.kills,
    )
    print(format_summary(summary))
    print(f"\nrows: {out}/soak.jsonl; summary: {out}/summary.json")
    bad = sum(summary[k] for k in ("lost", "duplicated", "reordered", "state_mismatches"))
    left = summary["leftover_queues"] or summary["leftovers_per_migration"]
    return 1 if bad or left else 0


def _cleanup(args: argparse.Namespace) -> int:
    removed = json.loads(_native.cleanup(all=args.all))
    print(
        f"removed {len(removed['containers'])} container(s) {removed['containers']}, "
        f"{len(removed['networks'])} network(s) {removed['networks']} and "
        f"{len(removed['processes'])} local process(es) {removed['processes']}"
    )
    for line in removed.get("repaired", []):
        print(line)
    return 0


def _testbed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="where the broker and the instances run (default auto: docker where a daemon "
        "answers, else local processes)",
    )
    p.add_argument("--amqp-url", help="use this existing broker instead of starting one")
    p.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="HOST=SPEC",
        help="a host's link to the broker's host, e.g. edge-1=20mbit,20ms,jitter=5ms "
        "(also up=5mbit, down=20mbit); repeat for each shaped host",
    )
    p.add_argument(
        "--host-link",
        action="append",
        default=[],
        metavar="A,B=SPEC",
        help="a link between two hosts for direct transfers, e.g. edge-1,edge-2=100mbit,2ms "
        "(up: from A to B); without one, a direct transfer crosses both hosts' --link",
    )
    p.add_argument(
        "--transfer",
        choices=TRANSFERS,
        default=MIGRATION_DEFAULTS["transfer"],
        help="how the checkpoint travels: through the broker, or from host to host "
        "(default %(default)s)",
    )


def _warmup_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--warmup-s",
        type=float,
        default=WARMUP_S,
        help="steady load before each migration (default %(default)s s; longer where the "
        "baseline window, as long as the migration, needs it)",
    )


def _settle_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--settle-s",
        type=float,
        default=MIGRATION_DEFAULTS["settle_s"],
        help="observation after the cutover, for the 'after' latencies (default %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ms2m", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="migrate with each strategy and compare the costs")
    c.add_argument("--strategies", nargs="+", default=["ms2m", "stop_and_copy"])
    c.add_argument("--runs", type=int, default=5, help="migrations per strategy (default 5)")
    c.add_argument("--rate", type=float, default=10.0, help="messages per second (default 10)")
    c.add_argument("--processing-ms", type=float, default=50.0)
    c.add_argument("--state-bytes", type=int, default=1_000_000)
    c.add_argument(
        "--prefetch",
        type=int,
        default=1,
        help="messages an instance keeps in flight (default 1; behind a --link, more: each "
        "message otherwise waits two of the link's round trips)",
    )
    c.add_argument("--message-bytes", type=int, default=64)
    _warmup_option(c)
    _settle_option(c)
    _until_ci_option(c, "--max-runs", "runs per strategy")
    c.add_argument("--out", help="folder for the reports (default results/compare-<time>)")
    _testbed_options(c)
    c.set_defaults(func=_compare)

    x = sub.add_parser("matrix", help="the papers' evaluation matrix, resumable")
    x.add_argument("--out", required=True, help="folder of the reports (resumes if present)")
    x.add_argument("--strategies", nargs="+", default=list(PAPER_STRATEGIES))
    x.add_argument("--rates", nargs="+", type=float, default=list(PAPER_RATES))
    x.add_argument("--repetitions", type=int, default=5)
    _until_ci_option(x, "--max-repetitions", "runs per cell")
    x.add_argument("--processing-ms", type=float, default=50.0)
    x.add_argument("--state-bytes", type=int, default=1_000_000)
    _warmup_option(x)
    _settle_option(x)
    x.add_argument(
        "--replay-timeout-s",
        type=float,
        default=MIGRATION_DEFAULTS["replay_timeout_s"],
        help="longest replay before a migration is aborted (default %(default)s)",
    )
    x.add_argument(
        "--replay-max-s",
        type=float,
        default=MIGRATION_DEFAULTS["replay_max_s"],
        help="T_replay_max of the cutoff (default %(default)s)",
    )
    _testbed_options(x)
    x.set_defaults(func=_matrix)

    r = sub.add_parser("run", help="run a testbed file (TOML)")
    r.add_argument("file")
    r.add_argument("--out", help="folder for the reports (default results/<file>-<time>)")
    r.set_defaults(func=_run)

    s = sub.add_parser("summarize", help="summarize a folder of reports")
    s.add_argument("folder")
    s.set_defaults(func=_summarize)

    f = sub.add_parser(
        "conformance",
        help="check an implementation of the wire contract (an image or a command) rule by rule",
    )
    f.add_argument("--image", help="docker runtime: the image to check (it must be on the engine)")
    f.add_argument(
        "--command",
        help="the program and its arguments, as one shell-quoted string (docker: instead of "
        "the image's entrypoint)",
    )
    f.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="repeat for each"
    )
    f.add_argument("--processing-ms", type=float, default=0.0)
    f.add_argument("--runtime", choices=RUNTIMES, default="auto")
    f.set_defaults(func=_conformance)

    s = sub.add_parser(
        "soak",
        help="a resumable chain of migrations across hosts, strategies and rates, with faults",
    )
    s.add_argument("--migrations", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--fault-rate",
        type=float,
        default=0.1,
        help="share of migrations with an instance killed as a phase begins",
    )
    s.add_argument(
        "--kills",
        nargs="+",
        choices=["source", "target", "broker"],
        default=["target", "source"],
        help="what the faults hit: the source or target instance is killed, the broker "
        "restarted (the service is then deployed durable); default source and target",
    )
    s.add_argument("--strategies", nargs="+", default=None)
    s.add_argument("--rates", nargs="+", type=float, default=[5.0, 10.0, 20.0])
    s.add_argument("--runtime", choices=RUNTIMES, default="auto")
    s.add_argument("--out", default=None, help="folder (default results/soak-SEED); resumes there")
    s.set_defaults(func=_soak)

    k = sub.add_parser("cleanup", help="remove containers and processes left by crashed runs")
    k.add_argument("--all", action="store_true", help="also those of running testbeds")
    k.set_defaults(func=_cleanup)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except _native.Ms2mError as e:
        print(f"ms2m: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ms2m: interrupted; the testbed was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
