"""``aiolm serve``: the OpenAI-compatible server over an in-process :class:`aiolm.Engine`."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

__all__ = ["build_parser", "serve_main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``aiolm serve`` options (server options, then the engine's)."""
    p = argparse.ArgumentParser(
        prog="aiolm serve",
        description="Serve a model under the OpenAI API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics).",
    )
    p.add_argument("--model", default=None,
                   help="a Hugging Face model directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body accepted (413 above)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    e = p.add_argument_group("engine")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--attention-backend", default="auto")
    e.add_argument("--schedule-policy", default="lpm", choices=["lpm", "dfs-weight", "fcfs"])
    e.add_argument("--no-radix-cache", action="store_true", help="disable prefix caching (ablation)")
    e.add_argument("--chunked-prefill-size", type=int, default=None)
    e.add_argument("--max-running-requests", type=int, default=None)
    e.add_argument("--max-total-tokens", type=int, default=None)
    e.add_argument("--mem-fraction", type=float, default=0.85)
    e.add_argument("--no-cuda-graphs", action="store_true")
    e.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    e.add_argument("--seed", type=int, default=0)
    return p


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``aiolm.Engine`` keyword arguments from parsed ``aiolm serve`` options."""
    return dict(
        dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        schedule_policy=args.schedule_policy, enable_radix_cache=not args.no_radix_cache,
        chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=args.max_running_requests, max_total_tokens=args.max_total_tokens,
        mem_fraction=args.mem_fraction, cuda_graphs=not args.no_cuda_graphs,
        load_format=args.load_format, seed=args.seed,
    )


def serve_main(argv: Sequence[str]) -> int:
    """Run ``aiolm serve`` until interrupted; returns the exit status.

    The engine is built (options validated) at once and started in the app's lifespan, so
    the model loads when uvicorn starts and the engine closes when it stops.
    """
    args = build_parser().parse_args(list(argv))
    import uvicorn

    from ..backends.engine import Engine
    from .app import DEFAULT_MAX_BODY_BYTES, create_app

    engine = Engine(args.model, **engine_options(args))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async with engine:
            yield

    app = create_app(engine, model_name=args.served_model_name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, lifespan=lifespan)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
