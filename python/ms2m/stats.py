"""Statistics across repeated runs (computed by the engine, ``rust/engine/src/stats.rs``).

As Hoefler and Belli ask of a benchmark (SC'15): a median comes with its 95% confidence
interval, distribution-free (a pair of order statistics whose coverage follows from the
binomial distribution; 6 runs at least), a ratio of two medians with its percentile bootstrap
interval (10,000 resamples of ChaCha8 with a fixed seed: the same runs give the same interval;
none under 6 runs), and two strategies are compared with a two-sided Mann-Whitney U test (exact
up to 60 runs in all without ties, else the normal approximation with tie correction).

    >>> ms2m.stats.median_ci([52.1, 49.8, 55.0, 51.2, 50.4, 53.3])["lo"]
    49.8
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypedDict

from . import _native

if TYPE_CHECKING:
    import pandas as pd

LEVEL = 0.95
"""The confidence level of every interval unless another is asked for."""


class MedianCi(TypedDict):
    """A median with its confidence interval (``lo``/``hi``/``coverage`` ``None`` below 6
    runs, where no pair of order statistics reaches 95%)."""

    n: int
    median: float
    lo: float | None
    hi: float | None
    #: The interval's exact coverage, at least the level asked for.
    coverage: float | None
    min: float
    max: float
    #: The interval's larger half-width over the median (``None`` without an interval).
    relative_half_width: float | None


class RankTest(TypedDict):
    """A two-sided Mann-Whitney U test: ``u`` of the first sample, its ``p``-value."""

    u: float
    p: float
    method: Literal["exact", "normal"]


class RatioCi(TypedDict):
    """median(a) / median(b) with its bootstrap interval (``None`` under 6 runs)."""

    ratio: float
    lo: float | None
    hi: float | None


def _load(text: str | None) -> object:
    return None if text is None else json.loads(text)


def median_ci(values: Sequence[float], level: float = LEVEL) -> MedianCi | None:
    """The median of ``values`` with its confidence interval (``None``: no value, or a NaN)."""
    return _load(_native.median_ci([float(v) for v in values], level))  # type: ignore[return-value]


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> RankTest | None:
    """Two-sided Mann-Whitney U test of ``a`` against ``b`` (``None``: an empty sample or a
    NaN)."""
    return _load(_native.mann_whitney([float(v) for v in a], [float(v) for v in b]))  # type: ignore[return-value]


def ratio_of_medians(
    a: Sequence[float], b: Sequence[float], level: float = LEVEL
) -> RatioCi | None:
    """median(``a``) / median(``b``) with its interval (``None``: an empty sample, a NaN, or
    ``b``'s median is 0)."""
    return _load(  # type: ignore[return-value]
        _native.ratio_of_medians([float(v) for v in a], [float(v) for v in b], level)
    )


def describe(
    df: pd.DataFrame, value: str = "downtime_ms", by: Sequence[str] = ("strategy",)
) -> pd.DataFrame:
    """Per group of ``by`` (e.g. the rows of :func:`ms2m.to_dataframe` or a sweep), ``value``'s
    runs, median with its 95% interval, relative half-width, and maximum."""
    import pandas as pd

    rows = []
    for key, g in df.groupby(list(by), sort=True):
        ci = median_ci(g[value].dropna().tolist())
        keys = key if isinstance(key, tuple) else (key,)
        rows.append(
            {
                **dict(zip(by, keys)),
                "n": 0 if ci is None else ci["n"],
                "median": None if ci is None else ci["median"],
                "ci_lo": None if ci is None else ci["lo"],
                "ci_hi": None if ci is None else ci["hi"],
                "rel_half_width": None if ci is None else ci["relative_half_width"],
                "max": None if ci is None else ci["max"],
            }
        )
    return pd.DataFrame(rows)
