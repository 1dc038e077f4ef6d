"""The public namespace: light to import, complete ``__all__``, every name resolves."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import pytest

import aiolm
import aiolm.backends

HEAVY = ("torch", "transformers", "openai", "triton", "tiktoken", "llguidance")


def test_import_aiolm_imports_no_heavy_dependency():
    code = (
        "import sys, json, aiolm, aiolm.backends, aiolm.program; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("module", [aiolm, aiolm.backends], ids=["aiolm", "aiolm.backends"])
def test_all_lists_every_public_name(module):
    public = {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
        and name not in ("annotations", "TYPE_CHECKING", "Any", "LAZY")
    }
    assert public - set(module.__all__) == set()
    assert len(module.__all__) == len(set(module.__all__))


@pytest.mark.parametrize("module", [aiolm, aiolm.backends], ids=["aiolm", "aiolm.backends"])
def test_every_name_in_all_resolves(module):
    for name in module.__all__:
        lazy = aiolm.backends.LAZY.get(name)
        if lazy is not None and importlib.util.find_spec(lazy) is None:
            continue  # that backend's module is not written yet
        assert getattr(module, name) is not None, name


def test_lazy_backends_resolve_to_their_classes():
    for name, module in aiolm.backends.LAZY.items():
        if importlib.util.find_spec(module) is None:
            continue
        cls = getattr(aiolm, name)
        assert cls is getattr(aiolm.backends, name) is getattr(importlib.import_module(module), name)
        assert issubclass(cls, aiolm.backends.Backend)


def test_unknown_attributes_raise_attribute_error():
    with pytest.raises(AttributeError, match="Engin"):
        aiolm.Engin  # noqa: B018
    with pytest.raises(AttributeError):
        aiolm.backends.Nope  # noqa: B018
