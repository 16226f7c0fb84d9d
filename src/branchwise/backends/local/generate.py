"""One request on the embedded model: its choices, each a few engine jobs, on the event loop.

The prompt is rendered with the model's chat template and tokenised on the preparing thread
(with the grammars, which can take milliseconds to build), never on the event loop nor on the
decoding thread. Then every choice runs at once as a task: a plain answer is one `engine.Job`;
a tool-calling answer is two (the grammar-constrained choice between `message:` and a function,
then the message or the arguments), the second starting from the first's prompt in the KV
cache. The `n` choices of a request go to the engine together, which reads their common prompt
once (`engine`).

Text reaches `emit` as the engine reports it, on the event loop. A choice task that is cancelled
(the client went away, the stream was closed) cancels its job, which leaves the batch at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from branchwise.backends.base import BackendError
from branchwise.backends.local.engine import Engine, Job, Outcome
from branchwise.backends.local.model import Model
from branchwise.backends.local.prompt import Plan, choice_grammar, response_grammar, schema_grammar
from branchwise.backends.local.sampling import Sampling
from branchwise.core.chat import ChatDelta, ChatResult, Choice, ToolCall, Usage

Emit = Callable[[ChatDelta], None]


@dataclass(slots=True)
class _Prompt:
    text: str
    tokens: list[int]
    template_stop: list[str]
    add_bos: bool


@dataclass(slots=True)
class _Gen:
    text: str
    finish_reason: str
    outcome: Outcome


class Generator:
    """Runs requests on `engine`; `prep` is the preparing thread."""

    def __init__(self, model: Model, engine: Engine, prep: Executor, repeat_penalty: float,
                 seeds: random.Random | None) -> None:
        self.model = model
        self.engine = engine
        self.prep = prep
        self.window = model.window
        self.repeat_penalty = repeat_penalty
        self.seeds = seeds

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    def _prompt(self, messages: list[dict[str, Any]]) -> _Prompt:
        text, template_stop, added_special = self.model.render(messages)
        return _Prompt(text, self.model.tokenize(text, not added_special), template_stop, not added_special)

    async def run(self, plan: Plan, emit: Emit | None) -> ChatResult:
        """All of `plan`'s choices; `emit` (when given) gets each piece as it comes."""
        p: _Prompt = await self._off_loop(self._prompt, plan.messages)
        self._check_window(len(p.tokens))
        usage = Usage(input_tokens=len(p.tokens))
        grammar = await self._off_loop(response_grammar, plan.response_format) if plan.response_format else None
        tasks = [asyncio.ensure_future(self._choice(plan, i, p, grammar, emit)) for i in range(plan.n)]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        for i, (_, tokens, cached) in enumerate(done):
            usage.output_tokens += tokens
            if i == 0:
                usage.cached_tokens = cached
        return ChatResult(choices=[c for c, _, _ in done], usage=usage)

    def _check_window(self, n: int) -> None:
        if n >= self.window:
            raise BackendError(
                f"the prompt is {n} tokens, more than the embedded model's context window ({self.window} tokens)",
                code="context_length_exceeded",
                status=400,
            )

    def _seed(self, plan: Plan, index: int) -> int:
        if plan.seed is not None:
            return plan.seed + index
        if self.seeds is not None:  # the backend's seed: a reproducible sequence of seeds
            return self.seeds.getrandbits(32)
        return random.getrandbits(32)

    def _sampling(self, plan: Plan, seed: int, grammar: str | None, temperature: float | None) -> Sampling:
        s = plan.sampling
        return Sampling(
            temperature=s["temperature"] if temperature is None else temperature,
            top_p=s.get("top_p", 0.95),
            top_k=s.get("top_k", 40),
            min_p=s.get("min_p", 0.05),
            repeat_penalty=s.get("repeat_penalty", self.repeat_penalty),
            frequency_penalty=s.get("frequency_penalty", 0.0),
            presence_penalty=s.get("presence_penalty", 0.0),
            seed=seed,
            grammar=grammar,
        )

    async def _generate(self, prompt: list[int], sampling: Sampling, stop: list[str], max_tokens: int | None,
                        on_text: Callable[[str], None] | None) -> _Gen:
        """One engine job, to its end."""
        self._check_window(len(prompt))
        room = self.window - len(prompt)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Outcome] = loop.create_future()
        parts: list[str] = []

        def sink(events: list[tuple[str, Any]]) -> None:
            for kind, value in events:
                if kind == "text":
                    parts.append(value)
                    if on_text is not None and not done.done():
                        on_text(value)
                elif done.done():
                    pass
                elif kind == "done":
                    done.set_result(value)
                else:
                    done.set_exception(value)

        job = Job(prompt, sampling, min(max_tokens, room) if max_tokens is not None else room, stop, sink, loop)
        try:
            self.engine.submit(job)
            outcome = await done
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise
        except Exception as e:
            raise BackendError(f"embedded model failed: {e}", code="model_error") from e
        return _Gen("".join(parts), outcome.finish_reason, outcome)

    async def _choice(self, plan: Plan, index: int, p: _Prompt, grammar: str | None,
                      emit: Emit | None) -> tuple[Choice, int, int]:
        """One choice: the Choice, the tokens it sampled, and the prompt tokens its first job
        found in the cache."""
        seed = self._seed(plan, index)
        stop = plan.stop + [s for s in p.template_stop if s not in plan.stop]

        def text_out(piece: str) -> None:
            if emit is not None:
                emit(ChatDelta(index=index, text=piece))

        def finish(reason: str) -> None:
            if emit is not None:
                emit(ChatDelta(index=index, finish_reason=reason))

        if plan.tool_mode is None:
            gen = await self._generate(p.tokens, self._sampling(plan, seed, grammar, None), stop, plan.max_tokens,
                                       text_out)
            finish(gen.finish_reason)
            return (Choice(index=index, text=gen.text, finish_reason=gen.finish_reason), gen.outcome.tokens,
                    gen.outcome.cached)

        # Tool calling. 1: decide between a message and a function call (unless forced).
        names = [t.name for t in plan.tools]
        spent, cached = 0, -1  # the decision step's tokens count against max_tokens
        if plan.tool_mode in names:
            picked: str | None = plan.tool_mode
        else:
            options = [f"functions.{n}:" for n in names]
            if plan.tool_mode == "auto":
                options.insert(0, "message:")
            if len(options) == 1:
                head = options[0]
            else:
                longest = max(len(self.model.tokenize(o, False)) for o in options) + 2
                gen = await self._generate(p.tokens, self._sampling(plan, seed, choice_grammar(options), 0.0), [],
                                           longest, None)
                spent, cached = gen.outcome.tokens, gen.outcome.cached
                head = gen.text.strip()
            picked = head[len("functions.") : -1] if head.startswith("functions.") else None
            if picked not in names:
                picked = None

        budget = None if plan.max_tokens is None else max(1, plan.max_tokens - spent)
        if picked is None:  # 2a: a plain message
            prompt = await self._off_loop(self.model.tokenize, p.text + "message:\n", p.add_bos)
            gen = await self._generate(prompt, self._sampling(plan, seed, grammar, None), stop, budget, text_out)
            finish(gen.finish_reason)
            return (Choice(index=index, text=gen.text, finish_reason=gen.finish_reason), spent + gen.outcome.tokens,
                    cached if cached >= 0 else min(gen.outcome.cached, len(p.tokens)))

        # 2b: the arguments of one function call, under the grammar of its parameter schema.
        tool = next(t for t in plan.tools if t.name == picked)
        call_id = "call_" + uuid.uuid4().hex[:24]
        if emit is not None:
            emit(ChatDelta(index=index, tool_index=0, tool_call_id=call_id, tool_name=picked))

        def args_out(piece: str) -> None:
            if emit is not None:
                emit(ChatDelta(index=index, tool_index=0, tool_arguments=piece))

        prompt = await self._off_loop(self.model.tokenize, p.text + f"functions.{picked}:\n", p.add_bos)
        args_grammar = await self._off_loop(schema_grammar, tool.parameters)
        gen = await self._generate(prompt, self._sampling(plan, seed, args_grammar, None), stop, budget, args_out)
        reason = "length" if gen.finish_reason == "length" else "tool_calls"
        finish(reason)
        choice = Choice(index=index, tool_calls=[ToolCall(id=call_id, name=picked, arguments=gen.text.strip())],
                        finish_reason=reason)
        return choice, spent + gen.outcome.tokens, cached if cached >= 0 else min(gen.outcome.cached, len(p.tokens))
