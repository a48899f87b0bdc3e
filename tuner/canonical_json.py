"""The one text form of a JSON value that identifies it: table keys, configs, candidates."""

from __future__ import annotations

import json
from typing import Any


def canonical(value: Any) -> str:
    """The JSON text that identifies a value (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
