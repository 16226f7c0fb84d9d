"""Deterministic mock of the OpenAI Chat Completions API, served over real HTTP.

Tests and benchmarks use it as the fake upstream model. It is a raw ASGI app
(no framework, orjson everywhere) so that it stays cheap enough to benchmark
against.

Routes
------
``POST /v1/chat/completions`` (also ``/chat/completions``)
    The completion endpoint, described below.
``GET /v1/models`` (also ``/models``)
    A model list: ``mock``, ``mock-reasoning``, ``mock-tools``. Tests change it through the
    app: ``model_ids`` (what is listed), ``models_status`` (another status than 200: the
    route fails with it), ``models_asked`` (requests received), ``reset_models()``.
``GET /_requests`` / ``DELETE /_requests``
    The JSON list of every chat request body received, in order / clear it.
``GET /healthz``
    ``{"status": "ok"}``.

Replies
-------
Let ``N = len(messages)`` and ``last_user`` be the text of the last message
with role ``user`` (string content, or the ``text`` of its text parts joined
with a single space), with directives removed and whitespace trimmed.
Choice ``i`` (``n`` choices, default 1) has the content::

    f"[{N} messages] Echo: {last_user}"              # i == 0
    f"[{N} messages] Alternative {i}: {last_user}"   # i > 0

If the last message has role ``tool`` the content is instead
``f"[{N} messages] Tool result: {tool_content}"`` (choices ``i > 0`` say
``f"[{N} messages] Alternative {i}: Tool result: {tool_content}"``), and no
tool is called again. Every chat response carries the header
``x-mock-messages: N``.

``max_completion_tokens`` (or else ``max_tokens``) truncates the content: it
is split with ``str.split(" ")`` and, when longer, only the first
``max_tokens`` words are kept and ``finish_reason`` is ``"length"``.

Usage: ``prompt_tokens`` is the number of whitespace-separated words in all
message text contents; ``completion_tokens`` the sum over choices of the
words of each choice's content (tool calls count 0);
``completion_tokens_details.reasoning_tokens`` the sum over choices of the
words of the reasoning text; ``prompt_tokens_details.cached_tokens`` is 0.

Streaming (``"stream": true``) sends SSE ``data: {json}\\n\\n`` events of
``chat.completion.chunk``, each in one ``send``: a ``{"role": "assistant",
"content": ""}`` delta per choice; the reasoning words (``reasoning_content``
deltas) then the content words, one word per chunk with its following space
kept, so that joining the deltas gives the exact text, choices interleaved
(word 0 of choice 0, word 0 of choice 1, ...); one empty delta with the
``finish_reason`` per choice; when ``stream_options.include_usage`` is set a
chunk with ``"choices": []`` and ``usage``; and finally ``data: [DONE]``.

Logprobs
--------
With ``logprobs: true`` each streamed piece of the content is one token whose entry is
``token_logprob(piece, k, top_logprobs)`` (deterministic), in ``choices[].logprobs.content``.

Disconnects
-----------
``MockUpstream.disconnected`` lists the requests whose client closed the
connection before the reply was complete.

Directives
----------
Written anywhere in the text of a ``system``, ``developer`` or ``user``
message as ``[[name=value]]`` or ``[[name]]``; they are removed from the
echoed text (together with the whitespace that follows them). When a
directive appears more than once, the last one wins. Note that directives in
earlier turns of a conversation still apply.

``[[delay=S]]``
    Sleep ``S`` seconds (float) before answering (before the headers).
``[[chunk_delay=S]]``
    Sleep ``S`` seconds between streamed events.
``[[fail=CODE]]``
    Answer HTTP ``CODE`` (400-599, otherwise 500) with the body
    ``{"error": {"message": "mock failure CODE", "type": "server_error",
    "param": null, "code": "mock_failure"}}``.
``[[words=K]]``
    The content is ``f"[{N} messages] w1 w2 ... wK"`` (choice ``i > 0``:
    ``f"[{N} messages] alt{i} w1 ... wK"``). Handy to get long replies.
``[[cut]]``
    Streaming: send the first half of the events, then drop the connection
    (no ``[DONE]``). Non-streaming: send the headers and half the body, then
    drop the connection. Clients see a protocol / read error either way.
``[[malformed]]``
    Streaming: after two good events send ``data: {not json`` and go on
    normally. Non-streaming: answer 200 with the body ``not json``.
``[[reasoning=TEXT]]``
    Add ``"reasoning_content": TEXT`` to each message (non-streaming), or
    stream it word by word as ``reasoning_content`` deltas before the
    content.
``[[tool=NAME]]`` / ``[[tool]]``
    Call the tool ``NAME`` (``[[tool]]``: the first tool of ``tools``, else
    ``mock_tool``). The same happens without a directive when ``tool_choice``
    is ``"required"`` (first tool) or names a function, and, when
    ``tool_choice`` is ``"auto"`` or absent and the last message is the
    user's, with the first tool whose name has a word of 4+ letters (split at
    ``_`` and ``-``) that the message has as a word, case aside
    (``get_weather`` for "What's the weather like?"). ``tool_choice:
    "none"`` and a last message with role ``tool`` disable tool calls. The
    message then has ``content: null`` and ``tool_calls: [{"id":
    "call_<hex>", "type": "function", "function": {"name": NAME,
    "arguments": ARGS}}]``, with ``finish_reason: "tool_calls"``. ``ARGS`` is
    the JSON of a deterministic instance of the tool's ``parameters`` schema
    (strings ``"x"``, integers ``1``, numbers ``1.0``, booleans ``true``,
    arrays of one element, objects with every property, the first ``enum``
    value), or ``{}`` without a schema. Streaming sends a first
    ``tool_calls`` delta with the id, name and empty arguments, then the
    arguments in 2-3 pieces.

``response_format``
    ``{"type": "json_schema", "json_schema": {"schema": S}}``: the content is
    the JSON of a deterministic instance of ``S`` (as above, but string
    properties hold the property name). ``{"type": "json_object"}``: the
    content is ``{"echo": last_user}``.

Use :class:`MockUpstream` in tests (uvicorn in a daemon thread, on its own
event loop), or run ``python -m branchwise.testing.mock_upstream --port 9100``.

Modules
-------
``directives``: message text and directives; ``schema``: JSON-schema
instances; ``replies``: reply planning (:func:`build_reply`); ``chat``: the
completion body and SSE chunks of a reply; ``asgi``: the raw ASGI app;
``server``: :class:`MockUpstream` and the CLI :func:`main`.
"""

from .asgi import MockAbort, MockUpstreamApp, create_app
from .asgi import app as app  # for ``uvicorn branchwise.testing.mock_upstream:app``
from .replies import build_reply
from .schema import schema_instance
from .server import MockUpstream, main

__all__ = [
    "MockAbort",
    "MockUpstream",
    "MockUpstreamApp",
    "build_reply",
    "create_app",
    "main",
    "schema_instance",
]
