"""Write a service that ms2m can migrate, in Python.

A service is a class with three methods: ``handle`` applies one message to the state and
returns its output (or ``None``), ``snapshot`` returns the whole state as bytes and ``restore``
replaces the state with a snapshot's::

    import json
    from ms2m.service import Service

    class WordCount(Service):
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def handle(self, payload: str) -> str | None:
            for word in payload.split():
                self.counts[word] = self.counts.get(word, 0) + 1
            return None

        def snapshot(self) -> bytes:
            return json.dumps(self.counts, sort_keys=True).encode()

        def restore(self, data: bytes) -> None:
            self.counts = json.loads(data)

Run it with ``python -m ms2m.service my_module:WordCount`` (or ``path/to/file.py:WordCount``),
which is the command a testbed deploys::

    tb.deploy("words", host="edge-1",
              command=["python3", "-m", "ms2m.service", "my_module:WordCount"])

On the docker runtime, build an image on ``ms2m/python:dev`` (its entrypoint is
``python3 -m ms2m.service``): ``FROM ms2m/python:dev``, ``COPY my_module.py /srv/``,
``CMD ["my_module:WordCount"]``, then ``tb.deploy("words", host="edge-1", image=...)``.

Everything else the wire contract asks of an instance (queues, acks after confirmed output
events, barrier checkpoints streamed in chunks, replay without side effects that skips what a
restored snapshot holds, every control command) is done by the same Rust library as the
reference service's, so a Python service obeys the contract as exactly as it does.

The rules a service must keep:

* The state is a function of the messages handled, in order, and of nothing else (no clock,
  no unseeded randomness): a migration's target replays messages onto a restored snapshot and
  must end where the source would have.
* ``handle`` has no effect outside the state: its return value is the only output, and ms2m
  drops it while a target replays (a message is handled once live, perhaps again in replay).
* ``restore`` leaves the state as it was when it raises.
* ``digest`` (optional) returns the same string for equal states; by default it is the SHA-256
  of the snapshot, so define it when equal states can give different bytes.

An exception in ``handle`` ends the instance as a crash would (the message is not acked and
goes back to the queue; the traceback is in the instance's log); one in ``snapshot`` fails the
checkpoint (the migration rolls back); one in ``restore`` is the restore's error reply.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

__all__ = ["Params", "Service", "load", "params", "run"]


class Service(abc.ABC):
    """The base class of a migratable service (optional: any object with the same methods
    works)."""

    @abc.abstractmethod
    def handle(self, payload: str) -> Any:
        """Applies one message's payload; returns its output (a ``str``, ``bytes`` in UTF-8,
        any JSON-serializable value) or ``None``."""

    @abc.abstractmethod
    def snapshot(self) -> bytes:
        """The whole state as bytes."""

    @abc.abstractmethod
    def restore(self, data: bytes) -> None:
        """Replaces the state with the one ``snapshot`` returned as ``data``."""

    def digest(self) -> str:
        """What the twin check compares: equal for equal states. SHA-256 of the snapshot."""
        return hashlib.sha256(self.snapshot()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Params:
    """The parameters the testbed gives an instance (``MS2M_*`` variables)."""

    service: str
    instance: str
    host: str
    live: bool
    processing_ms: float
    state_bytes: int
    prefetch: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Params:
        e = os.environ if env is None else env
        return cls(
            service=e.get("MS2M_SERVICE", ""),
            instance=e.get("MS2M_INSTANCE", ""),
            host=e.get("MS2M_HOST", ""),
            live=e.get("MS2M_LIVE", "0") in ("1", "true"),
            processing_ms=float(e.get("MS2M_PROCESSING_MS", "0") or 0),
            state_bytes=int(e.get("MS2M_STATE_BYTES", "0") or 0),
            prefetch=int(e.get("MS2M_PREFETCH", "1") or 1),
        )


def params() -> Params:
    """This instance's parameters, as the testbed set them (for sizing a state, say)."""
    return Params.from_env()


def _output(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    return json.dumps(value, sort_keys=True)


class _Adapter:
    """What the engine calls: the user's methods with their results in the engine's types."""

    def __init__(self, service: Any) -> None:
        missing = [
            m for m in ("handle", "snapshot", "restore") if not callable(getattr(service, m, None))
        ]
        if missing:
            raise TypeError(
                f"{type(service).__name__} is not a service: it lacks {', '.join(missing)} "
                "(see help(ms2m.service))"
            )
        self._service = service
        self.handle: Callable[[str], str | None] = lambda payload: _output(service.handle(payload))
        self.snapshot = service.snapshot
        self.restore = service.restore

    def digest(self) -> str:
        own = getattr(self._service, "digest", None)
        if callable(own):
            return str(own())
        return hashlib.sha256(self._service.snapshot()).hexdigest()


def run(service: Any, args: Sequence[str] = ()) -> None:
    """Runs ``service`` as one instance until it is shut down (a ``shutdown`` command or
    SIGTERM); ``handle`` gets each message's payload (a testbed's workload sends
    ``message_bytes`` characters of ``a-z2-7``, the same for the same seq). ``args`` are the
    instance's flags (``--amqp-url``, ``--service``, ``--instance``, ``--live``,
    ``--processing-ms``, ``--prefetch``); each falls back to its ``MS2M_*`` variable, which is
    how a testbed starts it. Every message, live or replayed, takes at least
    ``--processing-ms``: what ``handle`` took is topped up to it, so that a testbed's
    ``processing_ms`` means the same for every service."""
    from .._native import serve_service

    serve_service(_Adapter(service), list(args))


def load(spec: str) -> type:
    """The class named by ``module:Class`` (an importable module) or ``path/to/file.py:Class``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"expected module:Class or path/to/file.py:Class, got {spec!r}")
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path} (from {spec!r})")
        # Its own folder first, so that it imports its neighbours as when run as a script; a
        # name of its own, so that a file called `random.py` shadows nothing.
        sys.path.insert(0, str(path.resolve().parent))
        module_name = f"_ms2m_service_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(where)
    try:
        cls = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"{where} has no {name!r} (from {spec!r})") from None
    if not isinstance(cls, type):
        raise TypeError(f"{spec!r} is not a class")
    return cls
