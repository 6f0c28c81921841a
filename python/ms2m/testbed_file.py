"""Testbed files: an experiment described in TOML (format: ``testbeds/README.md``).

    python -m ms2m run testbeds/quickstart.toml

A file names the testbed's hosts and images, the service and its parameters, the workload, and
either the migrations to run one after another or a ``[sweep]`` grid. Unknown keys are refused
(a typo must not silently fall back to a default).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from . import _native
from .defaults import DEFAULT_HOSTS, MIGRATION_DEFAULTS
from .links import Link, as_link, pair_name
from .report import Report
from .sweeps import WARMUP_S, Grid, _tuple, run_grid
from .testbed import Testbed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS: dict[str, set[str]] = {
    "testbed": {
        "hosts",
        "runtime",
        "amqp_url",
        "broker_image",
        "service_image",
        "service_binary",
        "broker_startup_timeout_s",
        "links",
        "host_links",
    },
    "service": {
        "name",
        "host",
        "processing_ms",
        "state_bytes",
        "prefetch",
        "max_seq_gap",
        "durable",
        "image",
        "command",
        "env",
    },
    "workload": {"rate", "profile", "message_bytes", "seed", "warmup_s"},
    "migration": {
        "to",
        "strategy",
        "settle_s",
        "replay_timeout_s",
        "replay_max_s",
        "reply_timeout_s",
        "drain_timeout_s",
        "chunk_bytes",
        "transfer",
    },
    "sweep": {
        "strategies",
        "rates",
        "repetitions",
        "until_ci",
        "max_repetitions",
        "to",
        "processing_ms",
        "state_bytes",
        "prefetch",
        "message_bytes",
        "settle_s",
        "replay_timeout_s",
        "replay_max_s",
        "chunk_bytes",
        "link_mbit",
        "link_delay_ms",
        "link_jitter_ms",
        "transfer",
    },
}


def _refuse(path: Path, msg: str) -> _native.ConfigurationError:
    return _native.ConfigurationError(f"{path}: {msg}")


def load(path: str | Path) -> dict[str, Any]:
    """Reads and checks a testbed file; returns its tables."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise _refuse(p, "no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise _refuse(p, f"not valid TOML: {e}") from None
    unknown = set(data) - set(SECTIONS) - {"description"}
    if unknown:
        raise _refuse(p, f"unknown sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    for section, keys in SECTIONS.items():
        tables = data.get(section, [])
        for table in tables if isinstance(tables, list) else [tables]:
            bad = set(table) - keys
            if bad:
                raise _refuse(
                    p, f"[{section}] has unknown keys {sorted(bad)}; known: {sorted(keys)}"
                )
    if "service" not in data or "name" not in data["service"]:
        raise _refuse(p, "a [service] table with a name is required")
    if "workload" not in data:
        raise _refuse(p, "a [workload] table is required")
    if ("migration" in data) == ("sweep" in data):
        raise _refuse(p, "give either [[migration]] tables or a [sweep] table")
    if "migration" in data and not isinstance(data["migration"], list):
        raise _refuse(p, "migrations are an array of tables: write [[migration]]")
    try:
        _hosts(data.get("testbed", {}))
        _host_links(p, data.get("testbed", {}))
    except _native.ConfigurationError as e:
        raise _refuse(p, str(e)) from None
    return data


def run(
    path: str | Path, out_dir: str | Path | None = None, *, progress: TextIO | None = sys.stderr
) -> list[Report]:
    """Runs a testbed file; reports go to ``out_dir`` (default ``results/<file>-<time>``)."""
    p = Path(path)
    data = load(p)
    out = Path(out_dir) if out_dir else Path("results") / time.strftime(f"{p.stem}-%Y%m%d-%H%M%S")
    if "sweep" in data:
        url = data.get("testbed", {}).get("amqp_url")
        return run_grid(_grid(p, data), out, progress=progress, amqp_url=url)
    return _run_migrations(p, data, out, progress)


def _grid(path: Path, data: dict[str, Any]) -> Grid:
    svc, wl, sw = data["service"], data["workload"], data["sweep"]
    if "profile" in wl:
        raise _refuse(path, "a sweep varies constant rates: use [sweep] rates, not a profile")

    def axis(key: str, default: Any) -> tuple[Any, ...]:
        v = sw.get(key, svc.get(key, wl.get(key, default)))
        return tuple(v) if isinstance(v, list) else (v,)

    return Grid(
        strategies=tuple(sw.get("strategies", ())),
        rates=tuple(float(r) for r in sw.get("rates", [wl.get("rate", 10.0)])),
        repetitions=int(sw.get("repetitions", 1)),
        until_ci=None if sw.get("until_ci") is None else float(sw["until_ci"]),
        max_repetitions=int(sw.get("max_repetitions", 30)),
        processing_ms=tuple(float(v) for v in axis("processing_ms", 50.0)),
        state_bytes=tuple(int(v) for v in axis("state_bytes", 1_000_000)),
        prefetch=tuple(int(v) for v in axis("prefetch", 1)),
        message_bytes=tuple(int(v) for v in axis("message_bytes", 64)),
        warmup_s=float(wl.get("warmup_s", WARMUP_S)),
        settle_s=float(sw.get("settle_s", MIGRATION_DEFAULTS["settle_s"])),
        replay_timeout_s=float(sw.get("replay_timeout_s", MIGRATION_DEFAULTS["replay_timeout_s"])),
        replay_max_s=float(sw.get("replay_max_s", MIGRATION_DEFAULTS["replay_max_s"])),
        chunk_bytes=int(sw.get("chunk_bytes", MIGRATION_DEFAULTS["chunk_bytes"])),
        hosts=(svc.get("host", "edge-1"), sw.get("to", "edge-2")),
        runtime=data.get("testbed", {}).get("runtime", "auto"),
        links=_links(data.get("testbed", {})),
        # TOML has no null: a bandwidth of 0 is an unshaped one.
        link_mbit=tuple(float(v) or None for v in _tuple(sw.get("link_mbit", 0))),
        link_delay_ms=tuple(float(v) for v in _tuple(sw.get("link_delay_ms", 0.0))),
        link_jitter_ms=float(sw.get("link_jitter_ms", 0.0)),
        transfer=tuple(str(t) for t in _tuple(sw.get("transfer", "broker"))),
        image=svc.get("image"),
        command=None if svc.get("command") is None else tuple(svc["command"]),
        env=dict(svc.get("env", {})),
        host_links={
            pair_name(a, b): link
            for (a, b), link in _host_links(path, data.get("testbed", {})).items()
        },
    )


def _links(tbc: dict[str, Any]) -> dict[str, Link]:
    """The ``[testbed.links]`` table: each shaped host's :class:`~ms2m.Link` fields."""
    links = {h: as_link(h, v) for h, v in tbc.get("links", {}).items()}
    return {h: link for h, link in links.items() if link is not None}


def _host_links(path: Path, tbc: dict[str, Any]) -> dict[tuple[str, str], Link]:
    """The ``[[testbed.host_links]]`` array: ``between = ["a", "b"]`` and the link's fields."""
    out = {}
    for entry in tbc.get("host_links", []):
        fields = dict(entry)
        between = fields.pop("between", None)
        if not (isinstance(between, list) and len(between) == 2):
            raise _refuse(
                path,
                'each [[testbed.host_links]] needs between = ["host-a", "host-b"] and the '
                "link's fields (mbit, delay_ms, ...)",
            )
        a, b = between
        link = as_link(pair_name(a, b), fields)
        assert link is not None
        out[(a, b)] = link
    return out


def _hosts(tbc: dict[str, Any]) -> dict[str, Link | None]:
    links = _links(tbc)
    stray = set(links) - set(tbc.get("hosts", DEFAULT_HOSTS))
    if stray:
        raise _native.ConfigurationError(
            f"[testbed.links] names hosts {sorted(stray)} missing from [testbed] hosts"
        )
    return {h: links.get(h) for h in tbc.get("hosts", DEFAULT_HOSTS)}


def _run_migrations(
    path: Path, data: dict[str, Any], out: Path, progress: TextIO | None
) -> list[Report]:
    tbc, svc, wl = data.get("testbed", {}), data["service"], data["workload"]
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    kwargs = {k: v for k, v in tbc.items() if k not in ("hosts", "links", "host_links")}
    with Testbed(hosts=_hosts(tbc), host_links=_host_links(path, tbc), **kwargs) as tb:
        service = tb.deploy(
            svc["name"],
            host=svc.get("host", "edge-1"),
            processing_ms=svc.get("processing_ms", 50.0),
            state_bytes=svc.get("state_bytes", 1_000_000),
            prefetch=svc.get("prefetch", 1),
            max_seq_gap=svc.get("max_seq_gap", 1),
            durable=svc.get("durable", False),
            image=svc.get("image"),
            command=svc.get("command"),
            env=svc.get("env"),
        )
        try:
            with tb.workload(
                service,
                rate=wl.get("rate") if "profile" not in wl else None,
                profile=wl.get("profile"),
                message_bytes=wl.get("message_bytes", 64),
                seed=wl.get("seed", 0),
            ):
                time.sleep(wl.get("warmup_s", 2.0))
                for i, m in enumerate(data["migration"], 1):
                    if i > 1:
                        # Each migration's baseline window needs steady serving before it (it
                        # reaches back no further than the previous migration's end).
                        time.sleep(wl.get("warmup_s", 2.0))
                    opts = {k: v for k, v in m.items() if k not in ("to", "strategy")}
                    report: Report | None
                    try:
                        report = tb.migrate(
                            service, to=m["to"], strategy=m.get("strategy", "ms2m"), **opts
                        )
                    except _native.MigrationFailed as e:
                        report = getattr(e, "report", None)
                        if report is None:
                            raise
                    report.save(out / f"{i:02d}-{report.strategy}-to-{m['to']}.json")
                    reports.append(report)
                    if progress is not None:
                        print(f"[{i}/{len(data['migration'])}] {report!r}", file=progress)
            # Saved once everything sent has been processed, so that it checks again offline.
            tb.wait_processed(service)
            tb.save_history(service, out / "history.json")
        finally:
            tb.remove(service)
    return reports
