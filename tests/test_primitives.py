"""Primitives are frozen data; every bad argument raises an error that names it."""

from __future__ import annotations

import re

import pytest

from aiolm import ConstraintError, assistant, gen, image, select, system, user
from aiolm.constraints import Choices, JSONSchema, Regex
from aiolm.primitives import Concat, Gen, Role, Text, as_expr, parse_dtype


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"presence_penalty": -3.0}, "presence_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 8, "max_tokens": 4}, "min_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_regex": "("}, "stop_regex"),
        ({"seed": -5}, "seed"),
        ({"regex": "("}, "regex"),
        ({"regex": r"\d+", "json_schema": {"type": "object"}}, "regex, json_schema"),
        ({"choices": ["a"], "dtype": int}, "choices, dtype"),
        ({"choices": []}, "choices"),
        ({"choices": "abc"}, "choices"),
        ({"dtype": list}, "dtype"),
        ({"json_schema": 42}, "json_schema"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"constraint": "not a constraint"}, "constraint"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"return_logprobs": 1}, "return_logprobs"),
    ],
)
def test_gen_rejects_bad_argument_naming_it(kwargs, names):
    with pytest.raises((ValueError, TypeError), match=re.escape(names)):
        gen("x", **kwargs)


def test_gen_rejects_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match="name"):
        gen(3)


def test_gen_invalid_regex_is_a_constraint_error():
    with pytest.raises(ConstraintError, match="regex"):
        gen("x", regex="[a-")


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        (("x",), {"choices": []}, "choices"),
        (("x",), {"choices": "yes"}, "choices"),
        (("x",), {}, "choices"),
        (("x",), {"choices": ["a", "a"]}, "choices"),
        (("x",), {"choices": ["a", 1]}, "choices"),
        (("x", ["a", "b"]), {"method": "best"}, "method"),
        ((None, ["a"]), {}, "name"),
        (("", ["a"]), {}, "name"),
    ],
)
def test_select_rejects_bad_argument_naming_it(args, kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        select(*args, **kwargs)


@pytest.mark.parametrize("source", [3, None, ["a.png"], ""])
def test_image_rejects_bad_source_naming_itself(source):
    with pytest.raises((ValueError, TypeError), match="image"):
        image(source)


def test_image_accepts_paths_bytes_urls_and_pil_images():
    from PIL import Image as PILImage

    pil = PILImage.new("RGB", (2, 2))
    for source in ("cat.png", b"\x89PNG", bytearray(b"\x89PNG"), "https://x/y.png", pil):
        assert image(source).source is not None
    assert isinstance(image(bytearray(b"ab")).source, bytes)
    assert image("https://x/y.png").is_url and not image("cat.png").is_url


def test_role_cannot_contain_another_role():
    with pytest.raises(ValueError, match="user"):
        user("hi " + assistant("there"))


def test_exprs_compose_with_plus_into_flat_concat():
    expr = "Q: " + gen("a") + "\n" + select("b", ["x", "y"])
    assert isinstance(expr, Concat)
    assert [type(p).__name__ for p in expr.parts] == ["Text", "Gen", "Text", "Select"]
    assert isinstance(system("s") + user("u"), Concat)
    assert user("u") == Role(role="user", body=Text(text="u"))


def test_as_expr_rejects_non_text_values():
    with pytest.raises(TypeError, match="f-string"):
        as_expr(42)
    with pytest.raises(TypeError):
        gen("a") + 3


def test_gen_builds_constraints_from_its_arguments():
    assert gen("x", regex=r"\d+").constraint == Regex(r"\d+")
    assert gen("x", choices=["a", "b"]).constraint == Choices(("a", "b"))
    assert gen("x", json_schema={"type": "object"}).constraint == JSONSchema({"type": "object"})
    assert isinstance(gen("x", dtype=int).constraint, Regex)
    assert gen("x", dtype=str).constraint is None


def test_gen_sampling_params_merge_run_defaults_under_its_own():
    g = gen("x", temperature=0.5, stop="\n")
    params = g.sampling_params({"temperature": 1.0, "max_tokens": 7})
    assert (params.temperature, params.max_tokens, params.stop) == (0.5, 7, ("\n",))
    assert gen("x", top_logprobs=3).sampling_params().logprobs is True


def test_gen_is_hashable_and_compares_by_value():
    assert gen("x", stop=["a"]) == gen("x", stop=("a",))
    assert hash(gen("x", max_tokens=3)) == hash(gen("x", max_tokens=3))
    assert isinstance(gen("x"), Gen)


@pytest.mark.parametrize(
    ("dtype", "text", "value"),
    [(int, " 42", 42), (float, "-1.5", -1.5), (bool, "True", True), (bool, "no", False), (str, " a", " a")],
)
def test_parse_dtype_converts_generated_text(dtype, text, value):
    assert parse_dtype(dtype, text) == value


@pytest.mark.parametrize(("dtype", "text"), [(int, "x"), (float, "1,5"), (bool, "maybe")])
def test_parse_dtype_rejects_bad_text_naming_the_dtype(dtype, text):
    with pytest.raises(ValueError, match=f"dtype={dtype.__name__}"):
        parse_dtype(dtype, text)
