"""Build, run and remove the Ray Serve application: an ingress serving aiolm's OpenAI app in
front of ``replicas`` engine replicas whose router is chosen by ``routing``.

- :func:`build_app` returns the bound application, for ``serve.run`` on any Ray cluster;
- :func:`app_builder` is the same for a Serve config file (``import_path:
  aiolm.serve_ray:app_builder`` and ``args``);
- :func:`run_local` is ``aiolm serve --replicas N``: a local Ray instance, the app, and
  Serve's HTTP proxy on ``host:port`` until interrupted;
- :func:`delete` removes an application and its cache index;
- :func:`replica_statistics` reads each replica's engine statistics and indexed blocks.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from ..cache.block_events import DEFAULT_BLOCK_SIZE
from .router import INDEX_NAMESPACE, CacheAwareRouter, RoundRobinRouter, cache_index, index_name

__all__ = ["ROUTINGS", "app_builder", "build_app", "delete", "replica_statistics", "run_local"]

_log = logging.getLogger("aiolm.serve_ray")

#: Router per ``routing``: ``cache-aware`` (aiolm's), ``round-robin``, ``power-of-two`` (Ray
#: Serve's default).
ROUTINGS = {"cache-aware": CacheAwareRouter, "round-robin": RoundRobinRouter, "power-of-two": None}

ENGINE_DEPLOYMENT = "AiolmEngine"
INGRESS_DEPLOYMENT = "AiolmIngress"


class _Ingress:
    """The ingress replica: aiolm's OpenAI app (:func:`aiolm.server.create_app`) over a
    :class:`~aiolm.serve_ray.backend.RayBackend` on the engine replicas."""

    async def __init__(self, engines: Any, server_options: dict[str, Any], block_size: int) -> None:
        from .backend import RayBackend

        self._backend = RayBackend(engines, block_size=block_size)
        await self._backend.start()
        self._server_options = server_options

    def __serve_build_asgi_app__(self) -> Any:
        from ..server import create_app
        from .backend import SessionHeader

        return SessionHeader(create_app(self._backend, **self._server_options))


def _check(replicas: int, routing: str, imbalance: int) -> None:
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"replicas: must be a positive integer (got {replicas!r})")
    if routing not in ROUTINGS:
        raise ValueError(f"routing: one of {', '.join(ROUTINGS)} (got {routing!r})")
    if not isinstance(imbalance, int) or imbalance < 0:
        raise ValueError(f"imbalance: must be a non-negative integer (got {imbalance!r})")


def build_app(engine_options: dict[str, Any] | None = None, *, replicas: int = 1,
              routing: str = "cache-aware", imbalance: int = 4,
              server_options: dict[str, Any] | None = None, model_factory: str | None = None,
              model_factory_kwargs: dict[str, Any] | None = None,
              num_gpus: float | None = None, num_cpus: float | None = None,
              max_ongoing_requests: int = 256, block_size: int = DEFAULT_BLOCK_SIZE) -> Any:
    """The Serve application: ``replicas`` engine replicas (``engine_options``: the keywords
    of :class:`aiolm.Engine`, ``model`` among them; or ``model_factory``,
    ``"module:function"`` returning the model, called with ``model_factory_kwargs``) behind
    an ingress serving the OpenAI routes
    (``server_options``: the keywords of :func:`aiolm.server.create_app`).

    Each replica takes ``num_gpus`` GPUs (default: 1 when this machine has CUDA, else 0) and
    ``num_cpus`` CPUs (default 1 without GPUs, else 0); at most ``max_ongoing_requests`` run
    on one replica at once. ``routing`` picks the router (:data:`ROUTINGS`); ``imbalance`` is
    the cache-aware router's spill threshold (requests above the least-loaded replica).
    Raises ``ValueError`` naming a bad argument.
    """
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    _check(replicas, routing, imbalance)
    if num_gpus is None:
        import torch

        num_gpus = 1 if torch.cuda.is_available() else 0
    if num_cpus is None:
        num_cpus = 0 if num_gpus else 1
    router = ROUTINGS[routing]
    extra: dict[str, Any] = {}
    if router is not None:
        kwargs = {"imbalance": imbalance} if router is CacheAwareRouter else {}
        extra["request_router_config"] = RequestRouterConfig(
            request_router_class=router, request_router_kwargs=kwargs)
    from .replica import EngineReplica

    engines = serve.deployment(
        EngineReplica, name=ENGINE_DEPLOYMENT, num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests, health_check_period_s=2,
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus}, **extra,
    ).bind(dict(engine_options or {}), model_factory=model_factory,
           model_factory_kwargs=dict(model_factory_kwargs or {}), block_size=block_size)
    ingress = serve.deployment(
        serve.ingress()(_Ingress), name=INGRESS_DEPLOYMENT, num_replicas=1,
        max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(engines, dict(server_options or {}), block_size)


def app_builder(args: dict[str, Any]) -> Any:
    """:func:`build_app` for a Serve config file: ``args`` are its keywords
    (``engine_options``, ``replicas``, ``routing``, ...). Raises ``TypeError`` for an
    unknown one."""
    return build_app(**args)


def delete(name: str = "aiolm") -> None:
    """Delete the Serve application ``name`` (its replicas drain first) and its cache
    index."""
    import ray
    from ray import serve

    serve.delete(name)
    try:
        ray.kill(ray.get_actor(index_name(name), namespace=INDEX_NAMESPACE))
    except ValueError:  # no index: the app never served
        pass


def replica_statistics(name: str = "aiolm") -> dict[str, dict[str, Any]]:
    """Each replica's latest engine statistics (as it last reported them to the cache index,
    with ``indexed_blocks``: the blocks of its cache the index holds), by replica id."""
    import ray

    index = cache_index(name)
    stats, blocks = ray.get([index.statistics.remote(), index.block_counts.remote()])
    return {replica: {**s, "indexed_blocks": blocks.get(replica, 0)} for replica, s in stats.items()}


def run_local(engine_options: dict[str, Any], *, replicas: int, host: str = "127.0.0.1",
              port: int = 8000, routing: str = "cache-aware", imbalance: int = 4,
              server_options: dict[str, Any] | None = None, name: str = "aiolm",
              num_cpus: int | None = None, stop: threading.Event | None = None) -> int:
    """``aiolm serve --replicas N``: start a local Ray instance (``num_cpus``: its CPUs,
    default all), deploy :func:`build_app` as ``name`` at ``/`` with Serve's HTTP proxy on
    ``host:port``, serve until Ctrl-C / SIGTERM (or ``stop`` is set), then delete the app and
    stop Ray. Returns the exit status (0; 3 when the app did not start)."""
    import ray
    from ray import serve

    _check(replicas, routing, imbalance)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    stop = stop or threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(engine_options, replicas=replicas, routing=routing, imbalance=imbalance,
                        server_options=server_options)
        try:
            serve.run(app, name=name, route_prefix="/")
        except Exception as exc:
            _log.error("the Ray Serve application did not start: %r", exc)
            return 3
        _log.warning("serving %d engine replicas (%s routing) on http://%s:%d", replicas,
                     routing, host, port)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        delete(name)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()
