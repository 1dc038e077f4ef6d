"""The ``aiolm`` command: ``aiolm demo | serve | bench``, and the engine's flags they share.

Every engine flag is derived from the option's declaration on
:class:`~aiolm.engine.config.EngineConfig` (:func:`add_engine_arguments`), and parsed flags
become ``aiolm.Engine`` keyword arguments through :func:`engine_options`, so a command
line takes the same names, values and defaults as the Python API.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["add_engine_arguments", "engine_options", "main"]

_METAVARS = {int: "N", float: "X"}


def add_engine_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         names: Iterable[str] | None = None, *,
                         exclude: Iterable[str] = ()) -> None:
    """Add the flags of the engine options ``names`` (default: every one the command line
    takes, but ``exclude``) to ``parser`` or an argument group, as
    :class:`~aiolm.engine.config.EngineConfig` declares them: ``--option-name`` with the
    option's type, default, choices and help.

    An option may have more names (``--tp`` for ``--tp-size``). A bool option is a
    ``--X`` / ``--no-X`` pair; ``None`` among an option's choices is
    ``none``; a path option (``chat_template``) takes an existing file. Each value is
    checked as ``EngineConfig`` checks it, so a bad one is a usage error naming the flag.
    Raises ``KeyError`` for a name that is not an engine option.
    """
    import attrs

    from .engine.config import EngineConfig

    fields = attrs.fields_dict(EngineConfig)
    hints = typing.get_type_hints(EngineConfig)
    skip = set(exclude)
    every = [n for n, f in fields.items() if f.metadata["cli"] and n not in skip]
    for name in (list(names) if names is not None else every):
        field = fields[name]
        meta = field.metadata
        kinds = {typing.get_origin(t) or t for t in typing.get_args(hints[name]) or (hints[name],)}
        flag = "--" + (meta["flag"] or name).replace("_", "-")
        flags = (flag, *meta.get("aliases", ()))
        help_text = meta["help"].replace("%", "%%")
        if bool in kinds:
            if field.default is not None:   # None: the help says what decides
                help_text += " (default: on)" if field.default else " (default: off)"
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=field.default, help=help_text)
            continue
        if field.default is not None:
            help_text += " (default: %(default)s)"
        if meta["choices"]:
            choices = ["none" if c is None else c for c in meta["choices"]]
            parser.add_argument(*flags, dest=name, default=field.default, choices=choices,
                                help=help_text)
        elif os.PathLike in kinds:
            parser.add_argument(*flags, dest=name, default=field.default, type=_existing_file,
                                metavar="PATH", help=help_text)
        else:
            base = int if int in kinds else float if float in kinds else str
            parser.add_argument(*flags, dest=name, default=field.default,
                                type=_checked(base, field), metavar=_METAVARS.get(base),
                                help=help_text)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``aiolm.Engine`` keyword arguments from the engine flags parsed into ``args`` (every
    engine option the namespace has; ``none`` given for an option that takes None is
    None)."""
    import attrs

    from .engine.config import EngineConfig

    options = {}
    for field in attrs.fields(EngineConfig):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            if value == "none" and None in field.metadata["choices"]:
                value = None
            options[field.name] = value
    return options


def _checked(base: type, field: Any):
    """The ``type=`` of an engine flag: the text as ``base``, checked by the option's
    validator (its message becomes the usage error)."""
    def parse(text: str) -> Any:
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an' if base is int else 'a'} {base.__name__}, got {text!r}") from None
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except (TypeError, ValueError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return parse


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value!r}")
    return path


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aiolm demo",
        description="Run a small structured program on the embedded SmolLM2-135M-Instruct model (CPU).",
    )
    add_engine_arguments(parser, ["model", "device"])
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
