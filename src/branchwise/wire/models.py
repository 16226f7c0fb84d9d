"""Request bodies, validated with pydantic. Shapes follow OpenAI's spec; the branchwise
extensions (`concurrency`, `n`, fork and head bodies) are marked as such.

Union branches carry tags that start with `~` so that error messages can drop them from the
parameter path (see `wire.errors`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic.fields import FieldInfo

from branchwise.wire.ids import id_validator

# Strict scalars: OpenAI refuses `"n": "2"`, `"stream": "yes"` or `"temperature": "1"`, and so do
# these (an integer is still a valid float, as JSON has one number type).
Bool = Annotated[bool, Field(strict=True)]
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]

ResponseId = Annotated[str, AfterValidator(id_validator("response"))]
ConversationId = Annotated[str, AfterValidator(id_validator("conversation"))]
ItemId = Annotated[str, AfterValidator(id_validator("item"))]
PromptId = Annotated[str, AfterValidator(id_validator("prompt"))]


def _tag(v: Any, default: str = "") -> str:
    """A discriminated union's tag: the value's `type` (`default` when absent). A `type` that is
    not a string (`1`, `null`, `[]`) becomes a tag no branch has, hence a 400 naming it."""
    t = v.get("type", default) if isinstance(v, dict) else getattr(v, "type", default)
    if default and t in (None, ""):
        t = default
    return "~" + (t if isinstance(t, str) else repr(t))


# ---------------------------------------------------------------- content parts



class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputText(_Part):
    type: Literal["input_text"]
    text: str


class InputImage(_Part):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class InputFile(_Part):
    type: Literal["input_file"]
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None


class OutputText(_Part):
    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] | None = None


class Refusal(_Part):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[
    Annotated[InputText, Tag("~input_text")]
    | Annotated[InputImage, Tag("~input_image")]
    | Annotated[InputFile, Tag("~input_file")]
    | Annotated[OutputText, Tag("~output_text")]
    | Annotated[Refusal, Tag("~refusal")],
    Discriminator(_tag),
]

# ---------------------------------------------------------------- input items


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class Message(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    phase: Literal["commentary", "final_answer"] | None = None  # an assistant message's, kept as sent


class FunctionCall(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutput(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Part]


class Reasoning(_Item):
    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


class Compaction(_Item):
    """A `compaction` item from POST /v1/responses/compact, sent back verbatim."""

    type: Literal["compaction"]
    encrypted_content: str


class ItemReference(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["item_reference"] | None = "item_reference"
    id: ItemId


def _item_tag(v: Any) -> str:
    return _tag(v, "message")


InputItem = Annotated[
    Annotated[Message, Tag("~message")]
    | Annotated[FunctionCall, Tag("~function_call")]
    | Annotated[FunctionCallOutput, Tag("~function_call_output")]
    | Annotated[Reasoning, Tag("~reasoning")]
    | Annotated[Compaction, Tag("~compaction")]
    | Annotated[ItemReference, Tag("~item_reference")],
    Discriminator(_item_tag),
]

# ---------------------------------------------------------------- shared fields


def check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:
        return v
    if len(v) > 16:
        raise ValueError("metadata can hold at most 16 key-value pairs")
    for key, value in v.items():
        if len(key) > 64:
            raise ValueError(f"metadata key '{key[:20]}...' is longer than 64 characters")
        if len(value) > 512:
            raise ValueError(f"metadata value for '{key}' is longer than 512 characters")
        if "\x00" in key or "\x00" in value:  # (as in the listing's filters: PostgreSQL's text has no NUL)
            raise ValueError("metadata keys and values cannot contain NUL characters")
    return v


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConversationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: ConversationId


ConversationParam = Annotated[
    Annotated[ConversationId, Tag("~id")] | Annotated[ConversationRef, Tag("~ref")],
    Discriminator(lambda v: "~ref" if isinstance(v, dict | ConversationRef) else "~id"),
]


class TextFormatText(BaseModel):
    type: Literal["text"]


class TextFormatJsonSchema(BaseModel):
    type: Literal["json_schema"]
    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: Bool | None = None


class TextFormatJsonObject(BaseModel):
    type: Literal["json_object"]


TextFormat = Annotated[
    Annotated[TextFormatText, Tag("~text")]
    | Annotated[TextFormatJsonSchema, Tag("~json_schema")]
    | Annotated[TextFormatJsonObject, Tag("~json_object")],
    Discriminator(_tag),
]


class TextParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# ---------------------------------------------------------------- tools, reasoning


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


def _tool_tag(v: Any) -> str:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "~function" if t == "function" else "~other" if isinstance(t, str) else _tag(v)


class OtherTool(BaseModel):
    """Hosted tools (web_search, file_search, ...) have no Chat Completions equivalent."""

    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _unsupported(cls, v: str) -> str:
        raise ValueError(f"tool type '{v}' is not supported by branchwise; use 'function' tools")


Tool = Annotated[
    Annotated[FunctionTool, Tag("~function")] | Annotated[OtherTool, Tag("~other")],
    Discriminator(_tool_tag),
]


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


class ToolChoiceAllowed(BaseModel):
    """The model may call only these of `tools` (`mode` as a plain `tool_choice` says how)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["allowed_tools"]
    tools: list[ToolChoiceFunction] = Field(min_length=1, max_length=128)
    mode: Literal["none", "auto", "required"] | None = None


ToolChoiceObject = Annotated[
    Annotated[ToolChoiceFunction, Tag("~function")] | Annotated[ToolChoiceAllowed, Tag("~allowed_tools")],
    Discriminator(_tag),
]


class ReasoningParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


# ---------------------------------------------------------------- stored prompts

# A variable's value: a string, or an input part (an image or a file only where a message's
# content can hold one). An object is told apart by its `type`, anything else must be a string.
PromptVariable = Annotated[
    Annotated[str, Tag("~text")]
    | Annotated[InputText, Tag("~input_text")]
    | Annotated[InputImage, Tag("~input_image")]
    | Annotated[InputFile, Tag("~input_file")],
    Discriminator(lambda v: _tag(v) if isinstance(v, dict | BaseModel) else "~text"),
]


class PromptParam(BaseModel):
    """POST /v1/responses's `prompt`: a stored prompt (`/v1/prompts`, a branchwise extension of
    OpenAI's dashboard-only prompts), its version (default: the latest) and its variables."""

    model_config = ConfigDict(extra="forbid")
    id: PromptId
    version: str | None = Field(default=None, pattern=r"^[1-9][0-9]{0,8}$")
    variables: dict[str, PromptVariable] | None = None


class CreatePrompt(_Body):
    """branchwise extension: POST /v1/prompts (a prompt) and POST /v1/prompts/{id} (its next
    version). `{{name}}` in the instructions or in the text of the input messages is a variable."""

    instructions: str | None = None
    input: list[Message] | None = Field(default=None, max_length=100)
    metadata: dict[str, str] | None = None

    _check_metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))


# ---------------------------------------------------------------- POST /v1/responses


class CreateResponse(_Body):
    model: str = Field(min_length=1)
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: ResponseId | None = None
    conversation: ConversationParam | None = None
    store: Bool | None = True
    metadata: dict[str, str] | None = None
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, ge=0, le=1)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    max_output_tokens: Int | None = Field(default=None, ge=16)
    max_tool_calls: Int | None = Field(default=None, ge=1)
    text: TextParam | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: Bool | None = None
    reasoning: ReasoningParam | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    stream: Bool | None = False
    stream_options: dict[str, Any] | None = None
    background: Bool | None = False
    include: list[str] | None = None
    prompt: PromptParam | None = Field(default=None, description=(
        "A stored prompt (POST /v1/prompts, a branchwise extension) to put before the history: its "
        "instructions, then its messages, with `variables` in place."))
    context_management: list[dict[str, Any]] | None = None
    moderation: Any = None
    # branchwise extensions
    concurrency: Literal["branch", "queue", "reject"] | None = Field(default=None, description=(
        "branchwise extension: what a response on a conversation does when another is running on it: "
        "`branch` (default setting) runs at once from the head it read, `queue` waits its turn, "
        "`reject` answers 409."))
    n: Int = Field(default=1, ge=1, le=8, description=(
        "branchwise extension: how many alternative responses to make from the same input; the others "
        "come in `alternatives`."))

    _check_metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c.id if isinstance(c, ConversationRef) else c


# ---------------------------------------------------------------- conversations


class CreateConversation(_Body):
    metadata: dict[str, str] | None = None
    items: list[InputItem] | None = Field(default=None, max_length=20)

    _check_metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))


class UpdateConversation(_Body):
    metadata: dict[str, str] | None

    _check_metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))


class AddItems(_Body):
    items: list[InputItem] = Field(max_length=20)
    concurrency: Literal["branch", "queue", "reject"] | None = Field(default=None, description=(
        "branchwise extension: as POST /v1/responses's `concurrency`."))


class ForkConversation(_Body):
    """branchwise extension: POST /v1/conversations/{id}/fork"""

    item_id: ItemId | None = None
    metadata: dict[str, str] | None = None

    _check_metadata = field_validator("metadata")(classmethod(lambda cls, v: check_metadata(v)))


class MoveHead(_Body):
    """branchwise extension: POST /v1/conversations/{id}/head"""

    item_id: ItemId



# ---------------------------------------------------------------- POST /v1/responses/input_tokens, /compact


def _body_model(name: str, doc: str, shared: tuple[str, ...], described: dict[str, str] | None = None,
                **own: tuple[Any, Any]) -> type[_Body]:
    """A request body that also takes the `shared` fields of `CreateResponse`, declared exactly as
    it declares them (type, default, constraints), so they validate the same way on every route;
    `described` gives some of them a description of their own."""
    described = described or {}
    fields = {n: (CreateResponse.model_fields[n].annotation,
                  FieldInfo.merge_field_infos(CreateResponse.model_fields[n], description=described[n])
                  if n in described else CreateResponse.model_fields[n]) for n in shared}
    fields.update(own)
    namespace: dict[str, Any] = {"__doc__": doc, "__module__": __name__,
                                 "__annotations__": {n: t for n, (t, _) in fields.items()}}
    namespace.update({n: d for n, (_, d) in fields.items()})
    return type(name, (_Body,), namespace)


CountInputTokens = _body_model(
    "CountInputTokens",
    "POST /v1/responses/input_tokens: the parts of a POST /v1/responses body that make what the model sees.",
    ("input", "instructions", "previous_response_id", "conversation", "tools", "text", "reasoning",
     "truncation", "parallel_tool_calls", "tool_choice"),
    model=(str | None, Field(default=None, min_length=1)),
    personality=(str | None, Field(default=None, max_length=64)),
)

CompactRequest = _body_model(
    "CompactRequest",
    "POST /v1/responses/compact. `conversation` is a branchwise extension (OpenAI's body has none).",
    ("input", "instructions", "previous_response_id", "conversation", "prompt_cache_key",
     "prompt_cache_retention", "prompt_cache_options"),
    {"conversation": "branchwise extension: compact this stored conversation's history (the conversation "
                     "is not changed)."},
    model=(str, Field(min_length=1)),
    image=(dict[str, Any] | None, None),
    service_tier=(str | None, None),
)
