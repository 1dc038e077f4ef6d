"""aiolm replicas on Ray Serve, with cache-aware routing (``pip install 'aiolm[ray]'``).

One :class:`aiolm.Engine` per Serve replica, behind an ingress that serves aiolm's
OpenAI-compatible app; a request router that sends each request to the replica whose radix
cache holds the longest prefix of it (the replicas report their caches as block-hash
events), keeps a program's requests together, and spills when loads diverge. See
docs/serving.md, "Replicas on Ray Serve".

Ray is imported on first use of a name that needs it: the block index and the routing
policy (:mod:`.index`, :mod:`.policy`) are plain Python.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ROUTINGS", "BlockIndex", "CacheAwareRouter", "Decision", "RoundRobinRouter",
           "RoutingPolicy", "app_builder", "build_app", "delete", "replica_statistics",
           "run_local"]

_HOMES = {
    "ROUTINGS": ".app", "app_builder": ".app", "build_app": ".app", "delete": ".app",
    "replica_statistics": ".app", "run_local": ".app",
    "BlockIndex": ".index", "Decision": ".policy", "RoutingPolicy": ".policy",
    "CacheAwareRouter": ".router", "RoundRobinRouter": ".router",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'aiolm.serve_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
