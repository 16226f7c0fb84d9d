"""`BRANCHWISE_API_KEY`: when set, every /v1 route wants it as the bearer token."""

from __future__ import annotations

import httpx2
import openai
import pytest

from branchwise.app import create_app
from branchwise.settings import Settings


@pytest.fixture
async def locked_app(db_url, mock):
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url, api_key="s3cret"))
    async with app.router.lifespan_context(app):
        yield app


def _client(app, key: str) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(api_key=key, base_url="http://test/v1", http_client=http, max_retries=0)


async def test_wrong_key_is_401_everywhere(locked_app, mock):
    bad = _client(locked_app, "wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        await bad.responses.create(model="m", input="hi")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await bad.conversations.create()
    assert mock.requests == []
    good = _client(locked_app, "s3cret")
    r = await good.responses.create(model="m", input="hi")
    assert r.output_text == "[1 messages] Echo: hi"
    assert (await good.conversations.create()).id.startswith("conv_")
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=locked_app), base_url="http://test") as raw:
        assert (await raw.get("/healthz")).status_code == 200  # health needs no key
