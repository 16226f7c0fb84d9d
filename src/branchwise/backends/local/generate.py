"""Generation on the worker thread: one request's choices sampled from the loaded model, with
the tool-calling steps, reporting each piece of text as it comes (`emit`).

The prompt is rendered with the model's chat template, tokenised, and generated with
`Llama.create_completion(stream=True)`. That is what `create_chat_completion` does with the
template handler; doing it here gives exact prompt token counts (also for streams and for
`count_tokens`), a per-token cancellation hook and control over tool calling.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from branchwise.backends.base import BackendError
from branchwise.backends.local.model import Model
from branchwise.backends.local.prompt import Plan, choice_grammar, response_grammar, schema_grammar
from branchwise.core.chat import ChatDelta, ChatResult, Choice, ToolCall, Usage


class _Counter:
    """A llama stopping criterion: counts sampled tokens and stops when cancelled."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel
        self.calls = 0

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        self.calls += 1
        return self.cancel.is_set()


@dataclass(slots=True)
class _Gen:
    text: str
    finish_reason: str
    tokens: int


class Generator:
    """Samples with `model`; `cancelled` collects how many tokens each cancelled generation had
    sampled when it stopped."""

    def __init__(self, model: Model, n_ctx: int, repeat_penalty: float, seed: int | None,
                 cancelled: list[int]) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.repeat_penalty = repeat_penalty
        self.seed = seed
        self.cancelled = cancelled

    def run(self, plan: Plan, cancel: threading.Event, emit: Callable[[ChatDelta], None]) -> ChatResult:
        """Generate all choices, calling `emit` with streamed deltas as they come. Returns the
        whole result (for `complete`)."""
        prompt_text, template_stop, added_special = self.model.render(plan.messages)
        prompt = self.model.tokenize(prompt_text, not added_special)
        usage = Usage(input_tokens=len(prompt))
        choices: list[Choice] = []
        for index in range(plan.n):
            if cancel.is_set():
                break
            choices.append(self._run_choice(
                plan, index, prompt_text, prompt, template_stop, added_special, cancel, emit, usage))
        return ChatResult(choices=choices, usage=usage)

    def _generate(
        self,
        prompt: list[int],
        plan: Plan,
        seed: int | None,
        cancel: threading.Event,
        on_text: Callable[[str], None] | None,
        *,
        grammar: Any = None,
        stop: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> _Gen:
        llm = self.model.llm
        if len(prompt) >= self.n_ctx:
            raise BackendError(
                f"the prompt is {len(prompt)} tokens, more than the embedded model's context window "
                f"({self.n_ctx} tokens)",
                code="context_length_exceeded",
                status=400,
            )
        import llama_cpp

        counter = _Counter(cancel)
        sampling = dict(plan.sampling)
        if temperature is not None:
            sampling["temperature"] = temperature
        sampling.setdefault("repeat_penalty", self.repeat_penalty)
        chunks = llm.create_completion(
            prompt=prompt,
            max_tokens=max_tokens if max_tokens is not None else plan.max_tokens,
            stop=list(stop) if stop is not None else list(plan.stop),
            seed=seed,
            stream=True,
            grammar=grammar,
            stopping_criteria=llama_cpp.StoppingCriteriaList([counter]),
            **sampling,
        )
        parts: list[str] = []
        finish: str | None = None
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                piece = choice.get("text") or ""
                if piece:
                    parts.append(piece)
                    if on_text is not None:
                        on_text(piece)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                if cancel.is_set():
                    break
        finally:
            chunks.close()
        # The criterion runs once per sampled token, plus once after llama's loop ends normally.
        tokens = counter.calls - 1 if finish is not None else counter.calls
        if cancel.is_set():
            self.cancelled.append(max(0, tokens))
        return _Gen("".join(parts), finish or "stop", max(0, tokens))

    def _choice_seed(self, plan: Plan, index: int) -> int | None:
        if plan.seed is not None:
            return plan.seed + index
        if self.seed is not None:
            return None  # llama derives a reproducible sequence from the constructor seed
        return random.getrandbits(31)

    def _run_choice(
        self,
        plan: Plan,
        index: int,
        prompt_text: str,
        prompt: list[int],
        template_stop: list[str],
        added_special: bool,
        cancel: threading.Event,
        emit: Callable[[ChatDelta], None],
        usage: Usage,
    ) -> Choice:
        seed = self._choice_seed(plan, index)
        stop = plan.stop + [s for s in template_stop if s not in plan.stop]

        def text_out(piece: str) -> None:
            emit(ChatDelta(index=index, text=piece))

        if plan.tool_mode is None:
            gen = self._generate(
                prompt, plan, seed, cancel, text_out, grammar=response_grammar(plan.response_format), stop=stop
            )
            usage.output_tokens += gen.tokens
            emit(ChatDelta(index=index, finish_reason=gen.finish_reason))
            return Choice(index=index, text=gen.text, finish_reason=gen.finish_reason)

        # Tool calling. 1: decide between a message and a function call (unless forced).
        names = [t.name for t in plan.tools]
        spent = 0  # tokens of the decision step count against max_tokens
        if plan.tool_mode in names:
            picked: str | None = plan.tool_mode
        else:
            options = [f"functions.{n}:" for n in names]
            if plan.tool_mode == "auto":
                options.insert(0, "message:")
            if len(options) == 1:
                head = options[0]
            else:
                gen = self._generate(
                    prompt,
                    plan,
                    seed,
                    cancel,
                    None,
                    grammar=choice_grammar(options),
                    stop=[],
                    max_tokens=max(len(self.model.tokenize(o, False)) for o in options) + 2,
                    temperature=0.0,
                )
                usage.output_tokens += gen.tokens
                spent = gen.tokens
                head = gen.text.strip()
            picked = head[len("functions.") : -1] if head.startswith("functions.") else None
            if picked not in names:
                picked = None

        add_bos = not added_special
        budget = None if plan.max_tokens is None else max(1, plan.max_tokens - spent)
        if picked is None:  # 2a: a plain message
            gen = self._generate(
                self.model.tokenize(prompt_text + "message:\n", add_bos),
                plan,
                seed,
                cancel,
                text_out,
                grammar=response_grammar(plan.response_format),
                stop=stop,
                max_tokens=budget,
            )
            usage.output_tokens += gen.tokens
            emit(ChatDelta(index=index, finish_reason=gen.finish_reason))
            return Choice(index=index, text=gen.text, finish_reason=gen.finish_reason)

        # 2b: the arguments of one function call, under the grammar of its parameter schema.
        tool = next(t for t in plan.tools if t.name == picked)
        call_id = "call_" + uuid.uuid4().hex[:24]
        emit(ChatDelta(index=index, tool_index=0, tool_call_id=call_id, tool_name=picked))

        def args_out(piece: str) -> None:
            emit(ChatDelta(index=index, tool_index=0, tool_arguments=piece))

        gen = self._generate(
            self.model.tokenize(prompt_text + f"functions.{picked}:\n", add_bos),
            plan,
            seed,
            cancel,
            args_out,
            grammar=schema_grammar(tool.parameters),
            stop=stop,
            max_tokens=budget,
        )
        usage.output_tokens += gen.tokens
        finish = "length" if gen.finish_reason == "length" else "tool_calls"
        emit(ChatDelta(index=index, finish_reason=finish))
        return Choice(
            index=index,
            tool_calls=[ToolCall(id=call_id, name=picked, arguments=gen.text.strip())],
            finish_reason=finish,
        )

    # -- the Backend protocol ------------------------------------------------------------------
