"""The engine's defaults, read once from the native layer: Python repeats none of them.

Every keyword default, dataclass field and command-line default of a migration option refers
to :data:`MIGRATION_DEFAULTS`, so ``help()`` and ``--help`` show the engine's values.
"""

from __future__ import annotations

import json
from typing import Final

from . import _native
from .report_types import MigrationOptions

MIGRATION_DEFAULTS: Final[MigrationOptions] = json.loads(_native.default_migration_options())
"""The engine's default :class:`~ms2m.report_types.MigrationOptions` (read-only by convention):
``reply_timeout_s``, ``replay_timeout_s``, ``settle_s``, ``drain_timeout_s``, ``replay_max_s``,
``fault`` (none), ``chunk_bytes`` and ``transfer``."""

_TESTBED_DEFAULTS: Final = json.loads(_native.default_testbed_config())

DEFAULT_HOSTS: Final[tuple[str, ...]] = tuple(_TESTBED_DEFAULTS["hosts"])
"""The hosts of a testbed unless told otherwise."""

BROKER_STARTUP_TIMEOUT_S: Final[float] = float(_TESTBED_DEFAULTS["broker_startup_timeout_s"])
"""The engine's longest wait for the broker to accept connections, seconds."""
