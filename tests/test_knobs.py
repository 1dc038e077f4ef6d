"""The engine's environment knobs (aiolm.engine.knobs.env_flag)."""

from __future__ import annotations

import pytest

from aiolm.engine.knobs import env_flag


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), (" YES ", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False)])
def test_a_set_flag_reads_yes_or_no(monkeypatch, value, expected):
    monkeypatch.setenv("AIOLM_TEST_FLAG", value)
    assert env_flag("AIOLM_TEST_FLAG", default=not expected) is expected


def test_an_unset_flag_is_its_default(monkeypatch):
    monkeypatch.delenv("AIOLM_TEST_FLAG", raising=False)
    assert env_flag("AIOLM_TEST_FLAG") is False
    assert env_flag("AIOLM_TEST_FLAG", default=True) is True


def test_any_other_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("AIOLM_TEST_FLAG", "maybe")
    with pytest.raises(ValueError, match="AIOLM_TEST_FLAG.*'maybe'"):
        env_flag("AIOLM_TEST_FLAG")
