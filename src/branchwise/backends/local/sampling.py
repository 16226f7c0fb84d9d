"""One sequence's sampling, on llama.cpp's samplers, and the text its tokens make.

`Sampler` is a llama.cpp sampler chain per sequence, so every sequence in a batch has its own
settings, seed and repetition history; it is the chain `llama_cpp.Llama.create_completion`
builds (penalties over the last 64 tokens; then greedy at temperature 0, else top-k, top-p,
min-p, temperature and a seeded draw), so the embedded model samples as it did before batching.

A grammar (structured outputs, tool calls) is checked the way llama.cpp's own server does: the
token is drawn without it and kept if the grammar accepts it; only otherwise is the grammar
applied to the whole vocabulary and the token drawn again. Applying it to all 49,152 tokens
every step costs as much as a decoding step of the whole batch (docs/decisions/0046).

`StopText` turns token bytes into text: UTF-8 split across tokens, and stop strings, whose
possible beginnings are held back until they are known not to be one.
"""

from __future__ import annotations

import codecs
import ctypes
import math
from dataclasses import dataclass
from typing import Any

PENALTY_LAST_N = 64
"""Tokens the repetition penalties look back over (llama-cpp-python's `last_n_tokens_size`)."""


@dataclass(slots=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    grammar: str | None = None
    """GBNF text whose root rule is `root`, or None."""


class GrammarError(ValueError):
    """llama.cpp refused a grammar."""


class Sampler:
    def __init__(self, model: Any, s: Sampling) -> None:
        import llama_cpp as L

        self._chain = self._grammar = None
        self._arr: Any = None
        self.n_vocab = model.n_vocab
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._chain = chain
        add = L.llama_sampler_chain_add
        add(chain, L.llama_sampler_init_penalties(model.n_vocab, PENALTY_LAST_N, s.repeat_penalty,
                                                  s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            add(chain, L.llama_sampler_init_greedy())
        else:
            add(chain, L.llama_sampler_init_top_k(s.top_k))
            add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
            add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
            add(chain, L.llama_sampler_init_temp(s.temperature))
            seed = s.seed & 0xFFFFFFFF
            add(chain, L.llama_sampler_init_dist(seed if seed != L.LLAMA_DEFAULT_SEED else seed - 1))
        if s.grammar is not None:
            grammar = L.llama_sampler_init_grammar(model.vocab, s.grammar.encode("utf-8"), b"root")
            if not grammar:
                self.close()
                raise GrammarError("llama.cpp could not parse the grammar")
            self._grammar = grammar

    @property
    def constrained(self) -> bool:
        return self._grammar is not None

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits of batch position `index`; the sampler's state
        (repetition history, grammar) moves past it."""
        import llama_cpp as L

        if self._grammar is None:
            return L.llama_sampler_sample(self._chain, ctx, index)
        logits = L.llama_get_logits_ith(ctx, index)
        cur = self._candidates(logits)
        L.llama_sampler_apply(self._chain, ctypes.byref(cur))
        token = int(cur.data[cur.selected].id)
        one = (L.llama_token_data * 1)(L.llama_token_data(token, 1.0, 0.0))
        single = L.llama_token_data_array(one, 1, -1, False)
        L.llama_sampler_apply(self._grammar, ctypes.byref(single))
        if math.isinf(one[0].logit):  # the grammar forbids it: draw among the tokens it allows
            cur = self._candidates(logits)
            L.llama_sampler_apply(self._grammar, ctypes.byref(cur))
            L.llama_sampler_apply(self._chain, ctypes.byref(cur))
            token = int(cur.data[cur.selected].id)
        L.llama_sampler_accept(self._grammar, token)
        L.llama_sampler_accept(self._chain, token)
        return token

    def _candidates(self, logits: Any) -> Any:
        """Every token with its logit, as llama.cpp's samplers take them (filled with numpy:
        a Python loop over the vocabulary would cost milliseconds)."""
        import llama_cpp as L
        import numpy as np

        if self._arr is None:
            dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
            self._arr = np.empty(self.n_vocab, dtype=dtype)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        arr = self._arr
        arr["id"] = self._ids
        arr["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        arr["p"] = 0.0
        return L.llama_token_data_array(arr.ctypes.data_as(L.llama_token_data_p), self.n_vocab, -1, False)

    def close(self) -> None:
        import llama_cpp as L

        if self._chain is not None:
            L.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            L.llama_sampler_free(self._grammar)
            self._grammar = None


class StopText:
    """Token bytes in, text out: whole UTF-8 characters, cut at the first stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """The text that can be sent now, and whether a stop string was reached (the text is
        then everything before it, and nothing more follows)."""
        text = self._held + self._decoder.decode(data)
        if not self.stops:
            self._held = ""
            return text, False
        cut = -1
        for s in self.stops:
            i = text.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self._held = ""
            return text[:cut], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """What was held back, at the end of a generation that did not stop on a stop string."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text
