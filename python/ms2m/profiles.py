"""Rate profiles of the open-loop workload (pass one as ``profile=`` to ``Testbed.workload``).

Each returns the JSON-ready form the engine reads; messages are sent on the profile's absolute
schedule whatever the broker does, so latency cannot hide behind a slow send.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Profile = dict[str, Any]


def constant(rate: float) -> Profile:
    """``rate`` messages per second, evenly spaced."""
    return {"kind": "constant", "rate": rate}


def poisson(rate: float) -> Profile:
    """Exponentially distributed gaps with mean ``1 / rate`` (reproducible from the seed)."""
    return {"kind": "poisson", "rate": rate}


def steps(steps: Iterable[tuple[float, float]]) -> Profile:
    """Piecewise constant: ``[(at_s, rate), ...]``, the first at 0 s."""
    return {"kind": "steps", "steps": [{"at_s": a, "rate": r} for a, r in steps]}


def bursts(base_rate: float, burst_rate: float, burst_s: float, period_s: float) -> Profile:
    """``base_rate``, and ``burst_rate`` for the first ``burst_s`` of every ``period_s``."""
    return {
        "kind": "bursts",
        "base_rate": base_rate,
        "burst_rate": burst_rate,
        "burst_s": burst_s,
        "period_s": period_s,
    }
