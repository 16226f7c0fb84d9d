"""The embedded model's defaults for requests that do not say: a cap on output tokens, and a
conversation kept within the context window (`truncation: auto`), both echoed on the Response."""

from __future__ import annotations

import httpx2
import openai
import pytest

from branchwise.app import create_app
from branchwise.settings import Settings

pytestmark = pytest.mark.embedded
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 8)


@pytest.fixture
async def embedded(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", local_n_ctx=384, local_max_output_tokens=16)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
        async with openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=http, max_retries=0) as c:
            yield c


async def test_a_response_without_max_output_tokens_stops_at_the_cap(embedded):
    r = await embedded.responses.create(model="gpt-4.1-mini", input="Write a very long story about a dragon.")
    assert r.max_output_tokens == 16
    assert r.usage.output_tokens <= 16
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


async def test_a_conversation_past_the_window_goes_on_with_truncation_auto(embedded):
    conv = await embedded.conversations.create(items=[{"role": "user", "content": LONG} for _ in range(6)])
    r = await embedded.responses.create(model="m", conversation=conv.id, input="And now?")
    assert r.status in ("completed", "incomplete") and r.truncation == "auto"
    with pytest.raises(openai.BadRequestError) as err:
        await embedded.responses.create(model="m", conversation=conv.id, input="Again?", truncation="disabled")
    assert err.value.code == "context_length_exceeded"
    assert "truncation" in err.value.message
