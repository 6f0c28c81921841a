"""Links between hosts and the broker's host: bandwidth, one-way delay, jitter, outages.

    tb = ms2m.Testbed(hosts={
        "edge-1": ms2m.Link(mbit=20, delay_ms=20, jitter_ms=5),
        "edge-2": ms2m.Link(up_mbit=5, down_mbit=20, delay_ms=20),
        "cloud": None,  # reaches the broker directly
    })

The engine emulates each shaped link with a TCP relay that the host's instances reach the broker
through (this kernel has no netem to delay packets; a relay paces, delays and holds the same way
on the docker and the local runtime). At testbed start a probe measures every link's round trip
and throughput; ``tb.links`` and every report give the configured and the measured figures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _native


@dataclass(frozen=True)
class Link:
    """One host's link to the broker's host. Every figure left out is unshaped; ``Link()``
    has none yet, but the host's traffic goes through a relay that can be cut
    (:meth:`Testbed.outage`) or changed (:meth:`Testbed.set_link`) later.

    Args:
        mbit: bandwidth in both directions, Mbit/s of TCP payload.
        delay_ms: one-way delay, in each direction.
        jitter_ms: each piece of data is delayed by ``delay_ms`` plus a draw uniform in
            ``±jitter_ms`` (never below no delay); the stream keeps its order.
        up_mbit, down_mbit: bandwidth towards the broker and from it, where they differ
            (each overrides ``mbit`` for its direction).
    """

    mbit: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    up_mbit: float | None = None
    down_mbit: float | None = None

    def to_config(self) -> dict[str, Any]:
        """The engine's form (``LinkSpec``): each direction's bandwidth, delay, jitter."""
        return {
            "up_mbit": self.up_mbit if self.up_mbit is not None else self.mbit,
            "down_mbit": self.down_mbit if self.down_mbit is not None else self.mbit,
            "delay_ms": float(self.delay_ms),
            "jitter_ms": float(self.jitter_ms),
        }


_UNITS = {
    "mbit": ("mbit", 1.0),
    "kbit": ("mbit", 1e-3),
    "gbit": ("mbit", 1e3),
    "ms": ("delay_ms", 1.0),
    "s": ("delay_ms", 1e3),
}


def parse_link(text: str) -> Link:
    """A link from the command line's form: comma-separated ``20mbit``, ``20ms`` (delay),
    ``jitter=5ms``, ``up=5mbit``, ``down=20mbit``, or ``key=value`` with :class:`Link`'s
    field names (``delay_ms=20``)."""
    fields: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.rpartition("=")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", value.strip().lower())
        if m is None:
            raise _native.ConfigurationError(
                f"cannot read {part!r} in link {text!r}: write e.g. 20mbit,20ms,jitter=5ms"
            )
        number, unit = float(m.group(1)), m.group(2)
        if key in Link.__dataclass_fields__ and not unit:
            fields[key] = number
            continue
        if unit not in _UNITS:
            raise _native.ConfigurationError(
                f"unknown unit {unit!r} in link {text!r}; known: {sorted(_UNITS)}"
            )
        field, scale = _UNITS[unit]
        if key in ("up", "down") and field == "mbit":
            field = f"{key}_mbit"
        elif key == "jitter" and field == "delay_ms":
            field = "jitter_ms"
        elif key not in ("", "delay", "mbit", "rate"):
            raise _native.ConfigurationError(f"unknown key {key!r} in link {text!r}")
        fields[field] = number * scale
    return Link(**fields)


def parse_host_links(items: Sequence[str]) -> dict[str, Link]:
    """``HOST=SPEC`` items of the command line (``--link edge-1=20mbit,20ms``)."""
    out = {}
    for item in items:
        host, sep, spec = item.partition("=")
        if not sep or not host:
            raise _native.ConfigurationError(
                f"--link takes HOST=SPEC, e.g. edge-1=20mbit,20ms,jitter=5ms; got {item!r}"
            )
        out[host] = parse_link(spec)
    return out


def pair_name(a: str, b: str) -> str:
    """How reports name the link between two hosts: ``a<->b``."""
    return f"{a}<->{b}"


def split_pair(name: str) -> tuple[str, str]:
    """The two hosts of a pair's name (``a<->b``)."""
    a, sep, b = name.partition("<->")
    if not (sep and a and b):
        raise _native.ConfigurationError(
            f"a link between hosts is named 'a<->b', e.g. 'edge-1<->edge-2'; got {name!r}"
        )
    return a, b


def parse_pair_links(items: Sequence[str]) -> dict[str, Link]:
    """``A,B=SPEC`` items of the command line (``--host-link edge-1,edge-2=100mbit,2ms``), by
    the pair's name (``edge-1<->edge-2``)."""
    out = {}
    for item in items:
        hosts, sep, spec = item.partition("=")
        a, comma, b = hosts.partition(",")
        if not (sep and comma and a and b):
            raise _native.ConfigurationError(
                f"--host-link takes A,B=SPEC, e.g. edge-1,edge-2=100mbit,2ms; got {item!r}"
            )
        out[pair_name(a.strip(), b.strip())] = parse_link(spec)
    return out


def as_link(host: str, value: Link | Mapping[str, Any] | None) -> Link | None:
    """A host's link from a :class:`Link`, a table of its fields (testbed files), or None."""
    if value is None or isinstance(value, Link):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(Link.__dataclass_fields__)
        if unknown:
            raise _native.ConfigurationError(
                f"link of {host}: unknown keys {sorted(unknown)}; "
                f"known: {sorted(Link.__dataclass_fields__)}"
            )
        return Link(**value)
    raise _native.ConfigurationError(
        f"the link of {host} must be an ms2m.Link, a table of its fields, or None; got {value!r}"
    )
