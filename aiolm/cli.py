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


_HELP = """usage: aiolm [--version] {demo|serve|bench} [options]

Structured language-model programs: an async frontend, an in-process engine with
RadixAttention, an OpenAI backend and an OpenAI-compatible server.

commands:
  demo    run a small structured program on the embedded SmolLM2-135M-Instruct (CPU)
  serve   serve a model under the OpenAI API (/v1/completions, /v1/chat/completions, ...)
  bench   run the SGLang paper's benchmark workloads, with ablations and a transformers peer

aiolm COMMAND --help shows each command's options; docs/ has the guides."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aiolm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": _demo, "serve": _serve, "bench": _bench}
    if argv and argv[0] in ("-V", "--version"):
        print(f"aiolm {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"aiolm: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(_HELP, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
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
