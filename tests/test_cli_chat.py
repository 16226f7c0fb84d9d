"""`branchwise chat`: the REPL driven through its standard input against a served branchwise
(a real server process, the mock upstream), and what it did checked through the API."""

from __future__ import annotations

import re

import openai
import pytest

from .cli_helpers import cli
from .conftest import free_port

pytestmark = pytest.mark.e2e
KEY = "chat-test-key"


@pytest.fixture
def server(serve, db_url, mock):
    return serve({"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url,
                  "BRANCHWISE_API_KEY": KEY})


def chat(server, script: str, *args: str):
    return cli("sqlite:///unused.db", "chat", "--base-url", f"{server.url}/v1", "--api-key", KEY, "--model", "mock",
               *args, input=script)


def test_a_session_that_branches(server):
    result = chat(server, "\n".join([
        "Plan a day in Paris.",
        "/regen 3",  # three new answers beside the first; pick the third
        "3",
        "/branches",
        "/switch 1",  # back to the first answer
        "/tree",
        "/fork",
        "And in Rome?",
        "/help",
        "/nonsense",
        "/regen 9",
        "/quit",
    ]) + "\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    conv_id = re.search(r"conversation (conv_\w+)", out).group(1)
    fork_id = re.search(r"now in (conv_\w+)", out).group(1)

    # streamed answers, with the model, tokens and time of each
    assert "[1 messages] Echo: Plan a day in Paris." in out
    assert re.search(r"mock · \d+ in / \d+ out tokens · \d+\.\d s", out)
    # /regen 3: every alternative shown, the third picked
    for k in (1, 2, 3):
        assert f"── alternative {k} ──" in out
    assert "[1 messages] Alternative 2: Plan a day in Paris." in out
    assert "head → alternative 3" in out
    # /branches: the four answers, the head's (the third alternative) marked
    branches = [ln for ln in out.splitlines() if re.search(r"\d\. \[assistant\]", ln)]  # (the first after "you> ")
    assert len(branches) == 4 and "◀ head" in branches[3] and "Alternative 2" in branches[3]
    # /switch 1 moved the source conversation's head back to the first answer, and /fork left it there
    source = api.conversations.retrieve(conv_id)
    items = api.conversations.items.list(conv_id, order="asc").data
    assert [it.content[0].text for it in items] == ["Plan a day in Paris.", "[1 messages] Echo: Plan a day in Paris."]
    assert source.model_extra["head"] == items[-1].id
    # /tree drew the whole tree: the user's message and its four answers
    assert out.count("↳ [assistant]") >= 4
    # the fork went on from there
    forked = api.conversations.items.list(fork_id, order="asc").data
    assert [it.content[0].text for it in forked] == [
        "Plan a day in Paris.", "[1 messages] Echo: Plan a day in Paris.", "And in Rome?",
        "[3 messages] Echo: And in Rome?"]
    assert "/regen [n]" in out and "unknown command /nonsense" in out and "1-8" in out


def test_regen_goes_on_from_the_picked_answer(server):
    """An existing conversation: /regen answers the last message again under it, and what comes
    next follows the picked alternative."""
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    conv = api.conversations.create(items=[{"role": "user", "content": "Name a colour."}])
    result = chat(server, "/regen 2\n2\nWhy?\n", "--conversation", conv.id)  # (then end of input)
    assert result.exit_code == 0, result.output
    items = api.conversations.items.list(conv.id, order="asc").data
    assert [it.content[0].text for it in items] == [
        "Name a colour.", "[1 messages] Alternative 1: Name a colour.", "Why?", "[3 messages] Echo: Why?"]


def test_a_refused_key_or_no_server(server):
    refused = cli("sqlite:///unused.db", "chat", "--base-url", f"{server.url}/v1", "--api-key", "wrong", input="hi\n")
    assert refused.exit_code == 1 and "refused the API key (401)" in refused.stderr
    nobody = cli("sqlite:///unused.db", "chat", "--base-url", f"http://127.0.0.1:{free_port()}/v1", input="hi\n")
    assert nobody.exit_code == 1 and "cannot reach a server" in nobody.stderr
    unknown = chat(server, "hi\n", "--conversation", "conv_doesnotexist")
    assert unknown.exit_code == 1 and "404" in unknown.stderr
