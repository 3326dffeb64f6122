"""Names a package exports without importing their modules until first read (PEP 562).

The shared packages (``wire``, ``stores``, ``broker``) export many names; loading them lazily
means a worker without a status store never imports the Redis-only modules. Each package keeps
``_HOME`` (name -> module) and calls ``load`` from its ``__getattr__``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping


def load(package: str, home: Mapping[str, str], name: str) -> object:
    """``name`` from its module in ``home``, cached on ``package`` so later reads are plain."""
    where = home.get(name)
    if where is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    setattr(sys.modules[package], name, value)
    return value
