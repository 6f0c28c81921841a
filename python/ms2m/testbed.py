"""Testbeds, services and workloads: the blocking and the asyncio API.

A :class:`Testbed` starts a RabbitMQ broker (or uses an external one) and places service
instances on named hosts: containers on the testbed's own Docker network (runtime ``docker``),
or local processes (runtime ``local``, for machines without Docker). Everything it started is
removed when the ``with`` block ends, also on an exception or Ctrl-C.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, get_args

from . import _native, _reaper
from .defaults import BROKER_STARTUP_TIMEOUT_S, DEFAULT_HOSTS, MIGRATION_DEFAULTS
from .links import Link, as_link, pair_name
from .profiles import Profile, constant
from .report import Report
from .report_types import LinkReport, PhaseName, Role, Transfer

RUNTIMES = ("auto", "docker", "local")
TRANSFERS: tuple[Transfer, ...] = get_args(Transfer)


def _host_links(
    host_links: Mapping[tuple[str, str], Link | Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The engine's ``host_links``: each pair of hosts with its link."""
    out = []
    for pair, value in host_links.items():
        if isinstance(pair, str) or len(pair) != 2:
            raise _native.ConfigurationError(
                f"host_links are keyed by two host names, e.g. ('edge-1', 'edge-2'); got {pair!r}"
            )
        link = as_link(pair_name(*pair), value)
        if link is None:
            raise _native.ConfigurationError(f"host link {pair!r} needs a Link, not None")
        out.append({"between": list(pair), "link": link.to_config()})
    return out


@dataclass(frozen=True)
class Service:
    """A deployed service, as it was when this handle was made.

    ``amqp_url``, ``input_exchange`` and ``output_exchange`` let any AMQP client feed the service
    (JSON ``{"kind": "data", "seq": ..., "t_pub_ns": ..., "payload": ...}`` messages) or watch its
    output events; ``rust/wire/README.md`` describes both. After a migration,
    ``Testbed.service(name)`` returns a fresh handle with the new host and instance.
    """

    name: str
    host: str
    instance: str
    amqp_url: str
    input_exchange: str
    output_exchange: str

    @classmethod
    def _from_json(cls, text: str) -> Service:
        return cls(**json.loads(text))


def _name(service: Service | str) -> str:
    return service.name if isinstance(service, Service) else service


@dataclass(frozen=True)
class Fault:
    """A fault to inject into a migration: kill (SIGKILL) the ``kill`` instance ("source" or
    "target") ``after_ms`` into phase ``at_phase`` (0: as it begins; a fault still pending when
    the phase ends does not happen). Phases per strategy: ``STRATEGY_PHASES``.

    With ``outage_s``, not a kill: the link of that instance's host goes down for that many
    seconds (the host needs a :class:`~ms2m.Link`), and comes back by itself.

    With ``kill="broker"``: the broker restarts (down ``outage_s`` seconds, default none; see
    :meth:`Testbed.restart_broker`). The migration is rolled back unless the target already
    serves; a service deployed with ``durable=True`` loses no confirmed message."""

    kill: Role
    at_phase: PhaseName
    after_ms: float = 0.0
    outage_s: float | None = None


def _options(
    reply_timeout_s: float,
    replay_timeout_s: float,
    settle_s: float,
    drain_timeout_s: float,
    replay_max_s: float,
    fault: Fault | None,
    chunk_bytes: int,
    transfer: Transfer,
) -> str:
    if fault is not None and fault.kill not in ("source", "target", "broker"):
        raise _native.ConfigurationError(
            f"Fault.kill must be 'source', 'target' or 'broker', got {fault.kill!r}"
        )
    if transfer not in TRANSFERS:
        raise _native.ConfigurationError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
    return json.dumps(
        {
            "reply_timeout_s": reply_timeout_s,
            "replay_timeout_s": replay_timeout_s,
            "settle_s": settle_s,
            "drain_timeout_s": drain_timeout_s,
            "replay_max_s": replay_max_s,
            "fault": None
            if fault is None
            else {
                "kill": fault.kill,
                "at_phase": fault.at_phase,
                "after_ms": fault.after_ms,
                "outage_s": fault.outage_s,
            },
            "chunk_bytes": chunk_bytes,
            "transfer": transfer,
        }
    )


@contextmanager
def _report_on_failure() -> Iterator[None]:
    """Gives a MigrationFailed its report as a :class:`Report` (``e.report``)."""
    try:
        yield
    except _native.MigrationFailed as e:
        text = getattr(e, "report_json", None)
        e.report = None if text is None else Report.from_json(text)  # type: ignore[attr-defined]
        raise


def _config(
    hosts: Sequence[str] | Mapping[str, Link | Mapping[str, Any] | None],
    runtime: str,
    amqp_url: str | None,
    broker_image: str | None,
    service_image: str | None,
    service_binary: str | None,
    broker_startup_timeout_s: float,
    host_links: Mapping[tuple[str, str], Link | Mapping[str, Any]] | None = None,
) -> str:
    if isinstance(hosts, str):
        raise _native.ConfigurationError(
            f"hosts must be a sequence of names, not the string {hosts!r}"
        )
    if runtime not in RUNTIMES:
        raise _native.ConfigurationError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    cfg: dict[str, Any] = json.loads(_native.default_testbed_config())
    cfg["hosts"] = list(hosts)
    if isinstance(hosts, Mapping):
        links = {h: as_link(h, v) for h, v in hosts.items()}
        cfg["links"] = {h: link.to_config() for h, link in links.items() if link is not None}
    cfg["host_links"] = _host_links(host_links or {})
    cfg["runtime"] = runtime
    cfg["amqp_url"] = amqp_url or None
    cfg["service_binary"] = service_binary
    if broker_image is not None:
        cfg["broker_image"] = broker_image
    if service_image is not None:
        cfg["service_image"] = service_image
    cfg["broker_startup_timeout_s"] = broker_startup_timeout_s
    return json.dumps(cfg)


class RuleOutcome(TypedDict):
    """One rule of the wire contract, as :meth:`Testbed.conformance` found it."""

    rule: str
    passed: bool
    detail: str


def _service_spec(
    name: str,
    host: str,
    processing_ms: float,
    state_bytes: int,
    prefetch: int,
    image: str | None,
    command: Sequence[str] | None,
    env: Mapping[str, str] | None,
    max_seq_gap: int = 1,
    durable: bool = False,
) -> dict[str, Any]:
    if isinstance(command, str):
        raise _native.ConfigurationError(
            f"command is a list of program and arguments, not the string {command!r}"
        )
    _check_ints(state_bytes=state_bytes, prefetch=prefetch, max_seq_gap=max_seq_gap)
    return {
        "name": name,
        "host": host,
        "processing_ms": processing_ms,
        "state_bytes": state_bytes,
        "prefetch": prefetch,
        "max_seq_gap": max_seq_gap,
        "durable": bool(durable),
        "image": image,
        "command": None if command is None else list(command),
        "env": dict(env or {}),
    }


class Testbed:
    """A broker and a set of named hosts on which services run and between which they migrate.

    Use it as a context manager (``with ms2m.Testbed() as tb:``) or as an async one
    (``async with ms2m.Testbed() as tb:``); both start the broker on entry and remove every
    container on exit.

    Args:
        hosts: names of the hosts instances can be placed on (default: the engine's), or a
            mapping of each name to its :class:`~ms2m.Link` to the broker's host (None, or a
            name in a plain list: reaches the broker directly, and its link cannot change or
            fail later; ``Link()``: unshaped for now). Every link is probed at start
            (``tb.links``).
        runtime: where the broker and the instances run: ``"docker"`` (containers),
            ``"local"`` (Debian's ``rabbitmq-server`` and the ``ms2m-service`` binary as local
            processes), or ``"auto"`` (docker where a Docker daemon answers, local otherwise).
        amqp_url: an existing broker to use instead of starting one, e.g.
            ``amqp://guest:guest@10.0.0.5:5672/%2f``; the testbed removes only what it declared.
        broker_image: broker image (default ``ms2m/rabbitmq:3.10``, or ``$MS2M_BROKER_IMAGE``);
            the official ``rabbitmq`` image works too where a registry is reachable.
        service_image: image of the reference service (default ``ms2m/service:dev``).
        service_binary: local runtime: the ``ms2m-service`` binary (default
            ``$MS2M_SERVICE_BIN``, ``ms2m-service`` on PATH, or this checkout's release build).
        broker_startup_timeout_s: longest wait for the broker to accept connections (default:
            the engine's).
        host_links: links between two hosts, for direct checkpoint transfers
            (``migrate(..., transfer="direct")``): ``{("edge-1", "edge-2"): Link(mbit=100)}``,
            ``up`` being from the first host to the second. Without one, a direct transfer
            crosses the source host's link and then the target host's. Reported (and probed)
            as ``"edge-1<->edge-2"``.
    """

    def __init__(
        self,
        hosts: Sequence[str] | Mapping[str, Link | Mapping[str, Any] | None] = DEFAULT_HOSTS,
        *,
        runtime: str = "auto",
        amqp_url: str | None = None,
        broker_image: str | None = None,
        service_image: str | None = None,
        service_binary: str | None = None,
        broker_startup_timeout_s: float = BROKER_STARTUP_TIMEOUT_S,
        host_links: Mapping[tuple[str, str], Link | Mapping[str, Any]] | None = None,
    ) -> None:
        self._config = _config(
            hosts,
            runtime,
            amqp_url,
            broker_image,
            service_image,
            service_binary,
            broker_startup_timeout_s,
            host_links,
        )
        self._tb: _native.Testbed | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Testbed:
        """Starts the broker (blocking). Prefer ``with Testbed() as tb``."""
        if self._tb is None:
            _reaper.ensure_started()
            self._tb = _native.Testbed.start(self._config)
        return self

    async def start_async(self) -> Testbed:
        if self._tb is None:
            _reaper.ensure_started()
            self._tb = await _native.Testbed.start_async(self._config)
        return self

    def close(self) -> None:
        """Removes every container of the testbed. Idempotent."""
        if self._tb is not None:
            self._tb.close()

    def keep(self) -> None:
        """Leaves the containers running after this process (for debugging); effective when
        ``TESTCONTAINERS_COMMAND=keep`` was set before the testbed started. Remove them later
        with ``python -m ms2m cleanup --all``."""
        self._native.keep()

    async def close_async(self) -> None:
        if self._tb is not None:
            await self._tb.close_async()

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Testbed:
        return await self.start_async()

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()

    @property
    def _native(self) -> _native.Testbed:
        if self._tb is None:
            raise _native.Ms2mError(
                "the testbed is not started; use `with ms2m.Testbed() as tb:` or call start()"
            )
        return self._tb

    @property
    def id(self) -> str:
        """Identifier of this testbed; its containers carry it in the label ``ms2m.testbed``
        (its local processes in the environment variable ``MS2M_TESTBED``)."""
        return self._native.id

    @property
    def runtime(self) -> str:
        """The runtime it runs on: ``"docker"`` or ``"local"`` (``"auto"`` resolved)."""
        return self._native.runtime

    @property
    def amqp_url(self) -> str:
        """The broker's AMQP URL from this machine (the external one, if given)."""
        return self._native.amqp_url

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self._config)

    # -- links -----------------------------------------------------------------------------

    @property
    def links(self) -> dict[str, LinkReport]:
        """Each shaped host's link: ``configured`` (the engine's ``LinkSpec``), ``mechanism``,
        ``measured`` by the probe at start (round trip p50/p99 ms, Mbit/s up and down), and
        ``deviations`` from the configured figures beyond 10% (empty when within)."""
        return dict(json.loads(self._native.links_json))

    def set_link_outage(self, host: str, down: bool) -> None:
        """Starts (``down=True``) or ends an outage of ``host``'s link: while it lasts nothing
        its instances send or are sent crosses (connections stay open, data waits). The host
        needs a link from the start (any :class:`~ms2m.Link`, even ``Link()``). ``host`` may
        also name a link between two hosts (``"edge-1<->edge-2"``)."""
        self._native.set_link_outage(host, down)

    def set_link(self, host: str, link: Link) -> None:
        """Gives ``host``'s link new figures, for connections already open too (a link that
        degrades mid-run), and probes it again (``links`` has the new figures). The host needs
        a link from the start (any :class:`~ms2m.Link`, even ``Link()``); ``host`` may also
        name a link between two hosts (``"edge-1<->edge-2"``)."""
        self._native.set_link(host, json.dumps(link.to_config()))

    @contextmanager
    def outage(self, host: str) -> Iterator[None]:
        """``with tb.outage("edge-1"):`` the link of ``edge-1`` is down for the block."""
        self.set_link_outage(host, True)
        try:
            yield
        finally:
            self.set_link_outage(host, False)

    # -- services --------------------------------------------------------------------------

    def deploy(
        self,
        name: str,
        *,
        host: str,
        processing_ms: float = 50.0,
        state_bytes: int = 1_000_000,
        prefetch: int = 1,
        image: str | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_seq_gap: int = 1,
        durable: bool = False,
    ) -> Service:
        """Deploys a service and starts its first instance on ``host``: the reference service,
        or with ``image`` / ``command`` any implementation of the wire contract
        (``rust/wire/README.md``).

        Args:
            name: service name (letters, digits, ``-``, ``_``); prefixes its broker resources.
            host: one of the testbed's hosts.
            processing_ms: time spent on each message.
            state_bytes: size of the state payload each message mutates (the checkpoint size).
            prefetch: messages an instance may fetch ahead of processing.
            max_seq_gap: how far past the next seq an input may be and still be applied.
                1 (the default): only the next, as the testbed's own workload sends them;
                more for a producer of one's own that may lose messages. Anything else sent
                to the input exchange (malformed, oversized, a seq repeated or far ahead, a
                barrier the manager did not announce) goes to the dead-letter queue
                ``<name>.dead``, never into the state; reports count it
                (``report.counts["dead_letters"]``).
            durable: survive a broker restart (:meth:`restart_broker`, or a ``Fault`` with
                ``kill="broker"``): the service's queues and exchanges are durable, its input
                messages and output events persistent (a disk write per message at the
                broker), and its instances, workload and recorder reconnect.
            image: docker runtime: the image its instances run (it must be on the engine).
            command: the program and arguments an instance runs (docker: instead of the
                image's entrypoint; local: instead of ``ms2m-service``).
            env: more environment variables. Every instance gets the contract's too:
                ``MS2M_AMQP_URL``, ``MS2M_SERVICE``, ``MS2M_INSTANCE``, ``MS2M_HOST``,
                ``MS2M_LIVE`` (``1``: serve at once), ``MS2M_PROCESSING_MS``,
                ``MS2M_STATE_BYTES``, ``MS2M_PREFETCH``, ``MS2M_MAX_SEQ_GAP``. An instance is
                ready once it prints ``ms2m-service ready``; one that is not within 60 s, or
                exits, is an error quoting the last lines of its log.

        A service of one's own has no reference model: after each migration a twin (an
        instance of it that never migrates nor restores, kept until the service is removed)
        replays the messages confirmed since the last check, in order, and its digest must
        equal the migrated one's (``verdict.state.oracle ==
        "twin"``).
        """
        spec = _service_spec(
            name,
            host,
            processing_ms,
            state_bytes,
            prefetch,
            image,
            command,
            env,
            max_seq_gap,
            durable,
        )
        return Service._from_json(self._native.deploy(json.dumps(spec)))

    def conformance(
        self,
        name: str = "conformance",
        *,
        host: str | None = None,
        processing_ms: float = 0.0,
        state_bytes: int = 10_000,
        prefetch: int = 1,
        image: str | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> list[RuleOutcome]:
        """Runs the wire contract's rules against a service (deployed as :meth:`deploy` would,
        then removed): a barrier behind a backlog, restore refused while live, replay that skips
        what the snapshot holds and has no side effects, ``until_seq``, malformed input,
        ``stop_live`` handing back what it did not process. Returns
        each rule with ``passed`` and what was seen (for a broken rule, how it broke)."""
        spec = _service_spec(
            name,
            host or self.config["hosts"][0],
            processing_ms,
            state_bytes,
            prefetch,
            image,
            command,
            env,
        )
        return list(json.loads(self._native.conformance(json.dumps(spec))))

    def service(self, service: Service | str) -> Service:
        """A fresh handle on a deployed service (where it runs now)."""
        return Service._from_json(self._native.service_info(_name(service)))

    def remove(self, service: Service | str) -> None:
        """Removes a service: workload, instance, recorder and its queues and exchanges."""
        self._native.remove(_name(service))

    # -- workload --------------------------------------------------------------------------

    def start_workload(
        self,
        service: Service | str,
        *,
        rate: float | None = None,
        profile: Profile | None = None,
        message_bytes: int = 64,
        seed: int = 0,
    ) -> None:
        """Starts an open-loop workload: ``rate`` messages per second, or a rate ``profile``
        from :mod:`ms2m.profiles` (Poisson, steps, bursts). ``seed`` fixes the random parts."""
        _check_ints(message_bytes=message_bytes, seed=seed)
        if (rate is None) == (profile is None):
            raise _native.ConfigurationError("give either rate= or profile=, not both or neither")
        spec = json.dumps(
            {
                "profile": constant(rate) if rate is not None else profile,
                "message_bytes": message_bytes,
                "seed": seed,
            }
        )
        self._native.start_workload(_name(service), spec)

    def stop_workload(self, service: Service | str) -> None:
        """Stops the workload and waits for its outstanding publisher confirms."""
        self._native.stop_workload(_name(service))

    @contextmanager
    def workload(
        self,
        service: Service | str,
        *,
        rate: float | None = None,
        profile: Profile | None = None,
        message_bytes: int = 64,
        seed: int = 0,
    ) -> Iterator[None]:
        """Runs a workload (see :meth:`start_workload`) for the duration of a ``with`` block."""
        self.start_workload(
            service, rate=rate, profile=profile, message_bytes=message_bytes, seed=seed
        )
        try:
            yield
        finally:
            self.stop_workload(service)

    @asynccontextmanager
    async def workload_async(
        self,
        service: Service | str,
        *,
        rate: float | None = None,
        profile: Profile | None = None,
        message_bytes: int = 64,
        seed: int = 0,
    ) -> AsyncIterator[None]:
        """Async twin of :meth:`workload` (starting and stopping are quick calls)."""
        with self.workload(
            service, rate=rate, profile=profile, message_bytes=message_bytes, seed=seed
        ):
            yield

    # -- migration -------------------------------------------------------------------------

    def migrate(
        self,
        service: Service | str,
        *,
        to: str,
        strategy: str = "ms2m",
        reply_timeout_s: float = MIGRATION_DEFAULTS["reply_timeout_s"],
        replay_timeout_s: float = MIGRATION_DEFAULTS["replay_timeout_s"],
        settle_s: float = MIGRATION_DEFAULTS["settle_s"],
        drain_timeout_s: float = MIGRATION_DEFAULTS["drain_timeout_s"],
        replay_max_s: float = MIGRATION_DEFAULTS["replay_max_s"],
        fault: Fault | None = None,
        chunk_bytes: int = MIGRATION_DEFAULTS["chunk_bytes"],
        transfer: Transfer = MIGRATION_DEFAULTS["transfer"],
    ) -> Report:
        """Migrates ``service`` to host ``to`` and returns the checked report.

        After the cutover the workload goes on for ``settle_s`` seconds (the "after" latencies),
        then the engine waits until every message sent so far was processed (at most
        ``drain_timeout_s`` beyond the time the backlog needs at the service rate measured
        before the migration) and checks the whole history. ``replay_max_s`` is T_replay_max of
        the ``ms2m_cutoff`` strategy; ``fault`` injects a crash (see :class:`Fault`);
        ``chunk_bytes`` is the largest chunk the checkpoint is streamed in (4 KiB to 64 MiB);
        ``transfer`` is how it travels: ``"broker"`` (through a queue: the source host's link,
        then the target host's) or ``"direct"`` (the target reads it from the source over TCP,
        across the link between their hosts, as the paper's rsync; the report's
        ``migration.checkpoint.hops`` gives bytes and throughput per stretch). Every option
        defaults to the engine's value (``ms2m.defaults.MIGRATION_DEFAULTS``).

        Raises:
            ConfigurationError: unknown strategy or host, or bad options (nothing started).
            MigrationFailed: the migration was rolled back; the source kept serving where it
                could. Its ``report`` attribute holds the checked report of the aborted run.
        """
        options = _options(
            reply_timeout_s,
            replay_timeout_s,
            settle_s,
            drain_timeout_s,
            replay_max_s,
            fault,
            chunk_bytes,
            transfer,
        )
        with _report_on_failure():
            return Report.from_json(self._native.migrate(_name(service), to, strategy, options))

    async def migrate_async(
        self,
        service: Service | str,
        *,
        to: str,
        strategy: str = "ms2m",
        reply_timeout_s: float = MIGRATION_DEFAULTS["reply_timeout_s"],
        replay_timeout_s: float = MIGRATION_DEFAULTS["replay_timeout_s"],
        settle_s: float = MIGRATION_DEFAULTS["settle_s"],
        drain_timeout_s: float = MIGRATION_DEFAULTS["drain_timeout_s"],
        replay_max_s: float = MIGRATION_DEFAULTS["replay_max_s"],
        fault: Fault | None = None,
        chunk_bytes: int = MIGRATION_DEFAULTS["chunk_bytes"],
        transfer: Transfer = MIGRATION_DEFAULTS["transfer"],
    ) -> Report:
        """Async twin of :meth:`migrate`."""
        options = _options(
            reply_timeout_s,
            replay_timeout_s,
            settle_s,
            drain_timeout_s,
            replay_max_s,
            fault,
            chunk_bytes,
            transfer,
        )
        with _report_on_failure():
            text = await self._native.migrate_async(_name(service), to, strategy, options)
        return Report.from_json(text)

    def restart_broker(self, down_s: float = 0.0) -> None:
        """Restarts the broker the testbed started (RabbitMQ's application stops and starts
        again, down for ``down_s`` seconds in between): every connection closes, and queues and
        messages that are not durable are gone. A service deployed with ``durable=True`` rides
        it out: its instances, workload and recorder reconnect, keep their state, and no
        confirmed message is lost; what was sent during the restart is processed after it.
        Refused for an external broker (``amqp_url``)."""
        self._native.restart_broker(down_s)

    def broker_queues(self) -> dict[str, int]:
        """The broker's queues and their ready messages (the testbed's own excluded); empty
        when no service is deployed."""
        return {name: n for name, n in json.loads(self._native.broker_queues())}

    def wait_processed(self, service: Service | str, timeout_s: float = 60.0) -> bool:
        """Waits until every message sent to the service so far was processed live (at most
        ``timeout_s``; less when nothing is processed for 10 s). Returns whether it was."""
        return self._native.wait_processed(_name(service), timeout_s)

    def history(self, service: Service | str) -> dict[str, Any]:
        """The recorded history (sent messages, output events) for saving or offline checks."""
        return json.loads(self._native.history(_name(service)))

    def save_history(self, service: Service | str, path: str | Path) -> Path:
        """Writes the recorded history as JSON (``ms2m.check_history`` reads it back)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self._native.history(_name(service)))
        return p


def _check_ints(**values: object) -> None:
    for key, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _native.ConfigurationError(f"{key} must be a non-negative integer, got {v!r}")
