"""The ``aiolm`` command: ``aiolm demo | serve | bench``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aiolm demo",
        description="Run a small structured program on the embedded SmolLM2-135M-Instruct model (CPU).",
    )
    parser.add_argument("--model", default=None, help="a model path instead of the embedded model")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    import anyio

    from .demo import run_demo

    anyio.run(run_demo, args.model, args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": _demo, "serve": _serve, "bench": _bench}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: aiolm {demo|serve|bench} [options]   (aiolm COMMAND --help for each)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


def _serve(argv: list[str]) -> int:
    from .server.cli import serve_main

    return serve_main(argv)


def _bench(argv: list[str]) -> int:
    from .bench.cli import bench_main

    return bench_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
