"""EngineConfig validation: every bad option fails early with its name in the message."""

from __future__ import annotations

import pathlib

import pytest

from aiolm.constraints import ConstraintLimits, Regex
from aiolm.engine.config import EngineConfig
from aiolm.errors import ConstraintError


def test_defaults_are_valid_and_frozen():
    cfg = EngineConfig()
    assert cfg.model is None and cfg.tp_size == 1 and cfg.jump_forward
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_path_models_become_strings():
    assert EngineConfig(model=pathlib.Path("/m/x.gguf")).model == "/m/x.gguf"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dtype": "float8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "cpu:1"}, "device"),
        ({"attention_backend": "xformers"}, "attention_backend"),
        ({"schedule_policy": "random"}, "schedule_policy"),
        ({"chunked_prefill_size": 0}, "chunked_prefill_size"),
        ({"max_running_requests": 0}, "max_running_requests"),
        ({"max_total_tokens": -5}, "max_total_tokens"),
        ({"mem_fraction": 1.5}, "mem_fraction"),
        ({"load_format": "pickle"}, "load_format"),
        ({"tp_size": 0}, "tp_size"),
        ({"seed": -1}, "seed"),
        ({"aging_limit": -1}, "aging_limit"),
        ({"extend_graph_tokens": -1}, "extend_graph_tokens"),
        ({"extend_graph_tokens": 16}, "extend_graph_tokens"),   # below the smallest bucket
        ({"model": ""}, "model"),
        ({"load_format": "dummy"}, "model"),
    ],
)
def test_bad_values_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EngineConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"enable_radix_cache": 1}, "enable_radix_cache"),
        ({"cuda_graphs": "yes"}, "cuda_graphs"),
        ({"extend_graph_tokens": 64.0}, "extend_graph_tokens"),
        ({"max_total_tokens": 10.0}, "max_total_tokens"),
        ({"model": 3}, "model"),
        ({"constraint_limits": {"max_grammar_size": 10}}, "constraint_limits"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_argument(kwargs, name):
    with pytest.raises(TypeError, match=name):
        EngineConfig(**kwargs)


# ------------------------------------------- one declaration: the signature, the flags, the docs


def option_fields():
    import attrs

    return attrs.fields(EngineConfig)


def test_engine_takes_every_declared_option_with_its_declared_default():
    import inspect
    import typing

    from aiolm.backends.engine import Engine

    params = dict(inspect.signature(Engine).parameters)
    assert list(params) == [f.name for f in option_fields()]
    declared, taken = typing.get_type_hints(EngineConfig), typing.get_type_hints(Engine.__init__)
    for field in option_fields():
        if field.name == "model":  # the engine also takes a LoadedModel
            continue
        param = params[field.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, field.name
        assert param.default == field.default, field.name
        assert taken[field.name] == declared[field.name], field.name


def test_engine_passes_every_option_to_its_config():
    from aiolm.backends.engine import Engine

    options = {"dtype": "float32", "device": "cpu", "attention_backend": "torch",
               "schedule_policy": "fcfs", "enable_radix_cache": False,
               "chunked_prefill_size": 64, "max_running_requests": 3, "max_total_tokens": 999,
               "mem_fraction": 0.5, "cuda_graphs": False, "extend_graph_tokens": 128,
               "load_format": "dummy",
               "quantization": None, "tp_size": 1, "seed": 7, "jump_forward": False,
               "mix_decode": False, "shared_prefix_min_tokens": 64,
               "aging_limit": 2, "request_step_timeout": 1.5, "close_timeout": 2.5,
               "num_threads": 1, "overlap": True, "compile": True,
               "escape_special_tokens": False,
               "chat_template": "{{ messages }}",
               "constraint_limits": ConstraintLimits(max_grammar_size=1000)}
    assert set(options) | {"model"} == {f.name for f in option_fields()}
    engine = Engine("tiny-llama", **options)
    assert engine.config == EngineConfig(model="tiny-llama", **options)


def serve_options(*argv: str) -> dict:
    from aiolm.server.cli import build_parser, engine_options

    return engine_options(build_parser().parse_args(list(argv)))


def test_serve_has_a_flag_for_every_option_with_the_declared_default():
    assert EngineConfig(**serve_options()) == EngineConfig()
    on_the_command_line = {f.name for f in option_fields() if f.metadata["cli"]}
    assert set(serve_options()) == on_the_command_line
    assert on_the_command_line == {f.name for f in option_fields()} - {"constraint_limits"}


def test_serve_flags_set_the_options():
    options = serve_options("--no-jump-forward", "--aging-limit", "3", "--quantization", "none",
                            "--no-radix-cache", "--schedule-policy", "dfs-weight",
                            "--mem-fraction", "0.5", "--max-total-tokens", "4096",
                            "--no-escape-special-tokens", "--compile")
    config = EngineConfig(**options)
    assert (config.jump_forward, config.aging_limit, config.quantization) == (False, 3, None)
    assert (config.enable_radix_cache, config.schedule_policy) == (False, "dfs-weight")
    assert (config.mem_fraction, config.max_total_tokens) == (0.5, 4096)
    assert (config.escape_special_tokens, config.compile) == (False, True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "tpu"], "argument --device: device: must be 'auto'"),
    (["--mem-fraction", "1.5"], "argument --mem-fraction: mem_fraction: must be in (0, 1)"),
    (["--aging-limit", "-1"], "argument --aging-limit: aging_limit: must be >= 0"),
    (["--max-total-tokens", "1.5"], "argument --max-total-tokens: expected an int, got '1.5'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--tp-size", "0"], "argument --tp-size/--tp: tp_size: must be >= 1"),
])
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_options(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_and_demo_take_the_declared_device_flag(capsys):
    from aiolm.bench.cli import build_parser
    from aiolm.cli import add_engine_arguments, main

    device = next(f for f in option_fields() if f.name == "device")
    bench = build_parser()
    assert bench.parse_args([]).device == device.default
    assert bench.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "gpu"])
    assert "device: must be 'auto'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert device.metadata["help"] in " ".join(capsys.readouterr().out.split())
    with pytest.raises(KeyError):
        add_engine_arguments(bench, ["dtpye"])


def test_the_docs_table_lists_every_option_with_its_default():
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "engine.md").read_text()
    start = text.index("## Options")
    table = text[start:text.index("\n## ", start)]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.MULTILINE))
    for field in option_fields():
        assert field.name in rows, f"docs/engine.md: no row for {field.name}"
        if isinstance(field.default, str | bool | int | float):
            shown = f'"{field.default}"' if isinstance(field.default, str) else str(field.default)
            assert rows[field.name].strip().strip("`") == shown, field.name


def test_resolve_device_names_a_bad_device():
    import torch

    from aiolm.engine.config import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("tpu")
    with pytest.raises(TypeError, match="device"):
        resolve_device(3)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda:1' asked for, but CUDA is not available"):
            resolve_device("cuda:1")


def test_each_list_of_allowed_values_has_one_home():
    from aiolm import primitives
    from aiolm.backends import base
    from aiolm.engine import config, schedule_policy

    assert schedule_policy.POLICIES is config.SCHEDULE_POLICIES
    assert primitives.SELECT_METHODS is base.SELECT_METHODS
    assert base.SELECT_METHODS == ("token_length_normalized", "greedy", "unconditional_normalized")


@pytest.mark.anyio
async def test_the_engine_compiles_constraints_under_its_constraint_limits():
    from tiny_chat import tiny_chat_model

    from aiolm.backends.engine import Engine

    letters = Regex("[a-z]{3,9}")
    tight = ConstraintLimits(max_grammar_size=1)
    async with Engine(tiny_chat_model(), max_total_tokens=2048, constraint_limits=tight) as engine:
        with pytest.raises(ConstraintError, match="grammar size"):
            await engine.generate("x", constraint=letters, max_tokens=4)
    async with Engine(tiny_chat_model(), max_total_tokens=2048) as engine:
        assert (await engine.generate("x", constraint=letters, max_tokens=4)).usage.completion_tokens


@pytest.mark.parametrize(("kv_slots", "cuda", "expected"), [
    (862_383, True, 512),     # Llama-3-8B on a 141 GB card: the cap
    (100_000, True, 195),     # a smaller pool: 512 slots for each
    (20_000, True, 64),       # never fewer than the CPU's
    (862_383, False, 64),     # the CPU: 64 whatever the pool
])
def test_max_running_requests_by_default_follows_the_pool(kv_slots, cuda, expected):
    from aiolm.engine.runner import default_max_running_requests

    assert default_max_running_requests(kv_slots, cuda) == expected
