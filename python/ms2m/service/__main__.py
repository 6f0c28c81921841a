"""``python -m ms2m.service module:Class [flags]``: runs one instance of a Python service."""

from __future__ import annotations

import argparse
import signal
import sys

from . import load, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ms2m.service",
        description="Runs one instance of a Python service against the ms2m wire contract. "
        "Its parameters come from the MS2M_* variables a testbed sets, or from the flags after "
        "the class (--amqp-url URL --service NAME --instance ID [--live] [--processing-ms F] "
        "[--prefetch N] [--state-bytes N]).",
    )
    parser.add_argument("service", help="module:Class or path/to/file.py:Class")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the instance's flags")
    args = parser.parse_args(argv)
    try:
        cls = load(args.service)
        service = cls()
    # Any failure to build the service (an import error, a bad __init__) is the user's to see.
    except Exception as e:
        print(f"ms2m.service: cannot load {args.service}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    # Ctrl-C ends the instance at once, as it does the reference service's.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from .. import ConfigurationError, Ms2mError

    try:
        run(service, args.flags)
    except ConfigurationError as e:
        print(f"ms2m.service: {e}", file=sys.stderr)
        return 2
    except Ms2mError as e:
        print(f"ms2m.service: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
