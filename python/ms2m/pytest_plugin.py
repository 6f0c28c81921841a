"""pytest plugin (registered through the ``pytest11`` entry point): experiments as tests.

Fixtures:
    ms2m_testbed   one testbed (broker and hosts) for the whole session
    ms2m_service   a freshly deployed reference service per test, removed afterwards; its
                   parameters come from the ``ms2m`` marker:
                   ``@pytest.mark.ms2m(processing_ms=50, state_bytes=1_000_000, host="edge-1")``

Options:
    --ms2m-runtime auto|docker|local    where the broker and the instances run (default auto:
                                        docker where a Docker daemon answers, else local
                                        processes; ``$MS2M_RUNTIME``)
    --ms2m-amqp-url URL                 use this existing broker instead of starting one
                                        (``$MS2M_AMQP_URL``)
    --ms2m-hosts edge-1,edge-2,cloud    the testbed's hosts
    --ms2m-link HOST=SPEC               a host's link to the broker's host, e.g.
                                        ``edge-1=20mbit,20ms,jitter=5ms`` (repeat per host)
    --ms2m-keep                         keep the testbed's containers and processes after the
                                        session, for debugging
    --ms2m-require                      fail, rather than skip, when the runtime is unavailable
                                        (CI uses it: nothing real is skipped there)

Markers:
    ms2m(...)                           parameters of the service ms2m_service deploys

A test that uses the fixtures on a machine without the runtime is skipped with the reason
(what is missing and the command that provides it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from . import _native
from .links import parse_host_links
from .testbed import RUNTIMES, Service, Testbed

SERVICE_PARAMS = ("host", "processing_ms", "state_bytes", "prefetch")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ms2m", "ms2m migration testbed")
    g.addoption(
        "--ms2m-runtime",
        choices=RUNTIMES,
        default=os.environ.get("MS2M_RUNTIME") or "auto",
        help="where the broker and the instances run (default: auto, or $MS2M_RUNTIME)",
    )
    g.addoption(
        "--ms2m-amqp-url",
        default=os.environ.get("MS2M_AMQP_URL") or None,
        metavar="URL",
        help="use this existing broker instead of starting one (default: $MS2M_AMQP_URL)",
    )
    g.addoption("--ms2m-hosts", default="edge-1,edge-2,cloud", help="the testbed's hosts")
    g.addoption(
        "--ms2m-link",
        action="append",
        default=[],
        metavar="HOST=SPEC",
        help="a host's link to the broker's host, e.g. edge-1=20mbit,20ms,jitter=5ms "
        "(repeat per host; see ms2m.Link)",
    )
    g.addoption(
        "--ms2m-keep",
        action="store_true",
        help="keep the testbed's containers and processes after the session, for debugging",
    )
    g.addoption(
        "--ms2m-require",
        action="store_true",
        help="fail instead of skipping when the runtime (Docker, images) is unavailable",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ms2m(host=, processing_ms=, state_bytes=, prefetch=): parameters of the service "
        "the ms2m_service fixture deploys",
    )


@pytest.fixture(scope="session")
def ms2m_testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """One testbed for the session; skipped (or failed with --ms2m-require) without its
    runtime."""
    config = request.config
    keep = bool(config.getoption("--ms2m-keep"))
    if keep:
        # testcontainers reads it when its client is created: before the first container.
        os.environ["TESTCONTAINERS_COMMAND"] = "keep"
    names = [h for h in str(config.getoption("--ms2m-hosts")).split(",") if h]
    try:
        links = parse_host_links(config.getoption("--ms2m-link"))
        stray = set(links) - set(names)
        if stray:
            raise _native.ConfigurationError(
                f"--ms2m-link names hosts {sorted(stray)} missing from --ms2m-hosts {names}"
            )
        hosts = {h: links.get(h) for h in names}
        tb = Testbed(
            hosts=hosts,
            runtime=str(config.getoption("--ms2m-runtime")),
            amqp_url=config.getoption("--ms2m-amqp-url"),
        ).start()
    except _native.RuntimeUnavailable as e:
        if config.getoption("--ms2m-require"):
            pytest.fail(f"ms2m runtime required but unavailable: {e}", pytrace=False)
        pytest.skip(f"ms2m: {e}")
    except _native.ConfigurationError as e:
        pytest.fail(f"ms2m: the testbed options are invalid: {e}", pytrace=False)
    yield tb
    if keep:
        tb.keep()
        print(f"\nms2m: kept testbed {tb.id} (remove it with `python -m ms2m cleanup --all`)")
    else:
        tb.close()


@pytest.fixture
def ms2m_service(ms2m_testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[Service]:
    """A reference service deployed for this test (``ms2m`` marker for its parameters)."""
    marker = request.node.get_closest_marker("ms2m")
    params: dict = {"host": "edge-1", "processing_ms": 50.0, "state_bytes": 1_000_000}
    if marker is not None:
        unknown = set(marker.kwargs) - set(SERVICE_PARAMS)
        if unknown:
            raise _native.ConfigurationError(
                f"unknown ms2m marker arguments {sorted(unknown)}; known: {SERVICE_PARAMS}"
            )
        params.update(marker.kwargs)
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-")[-40:] or "svc"
    svc = ms2m_testbed.deploy(name, **params)
    yield svc
    ms2m_testbed.remove(svc)
