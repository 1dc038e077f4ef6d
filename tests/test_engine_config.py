"""EngineConfig validation: every bad option fails early with its name in the message."""

from __future__ import annotations

import pathlib

import pytest

from aiolm.engine.config import EngineConfig


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
        ({"tp_size": 2}, "tp_size"),
        ({"seed": -1}, "seed"),
        ({"aging_limit": -1}, "aging_limit"),
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
        ({"max_total_tokens": 10.0}, "max_total_tokens"),
        ({"model": 3}, "model"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_argument(kwargs, name):
    with pytest.raises(TypeError, match=name):
        EngineConfig(**kwargs)
