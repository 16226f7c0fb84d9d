"""The explorer in a real browser: Playwright driving Debian's chromium against `branchwise serve`
(a subprocess, SQLite) and the mock upstream, over real sockets.

Every page of every test runs with the network watched: a request for any other origin fails
the test (and is refused), and so does any console error or warning, or an uncaught exception
on the page. Screenshots of the states tested go to tests/artifacts/explorer/ (git-ignored).
Without chromium (or playwright) every test here skips with one reason; under CI=true they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import ROOT, Server, unavailable

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("BRANCHWISE_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts" / "explorer"
MODEL = "mock"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        unavailable("browser tests: playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        unavailable(f"browser tests: no chromium at {CHROMIUM} (apt-get install chromium, "
                    "or set BRANCHWISE_TEST_CHROMIUM)")
    expect.set_options(timeout=15_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Site:
    """A server and the clients that seed it: the official SDK first, plain HTTP for the
    extension routes."""

    def __init__(self, server: Server):
        self.server = server
        self.url = server.url
        self.sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        self.http = httpx.Client(base_url=server.url, timeout=30)

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, path: str, **params) -> dict:
        r = self.http.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    def tree(self, conv_id: str) -> dict:
        rows, after = [], None
        for _ in range(100):
            page = self.get(f"/v1/conversations/{conv_id}/tree", limit=1000, include=["item", "node"],
                            **({"after": after} if after else {}))
            rows += page["data"]
            if not page["has_more"]:
                return {**page, "data": rows}
            after = page["last_id"]
        raise AssertionError("tree paging did not end")

    def head_path(self, conv_id: str) -> list[str]:
        """The nodes from the root to the head."""
        t = self.tree(conv_id)
        nodes = {r["node"]: r for r in t["data"]}
        path, n = [], nodes.get(t["head_node"])
        while n is not None:
            path.append(n["node"])
            n = nodes.get(n["parent_node"])
        return path[::-1]

    def conversation(self, conv_id: str) -> dict:
        return self.get(f"/v1/conversations/{conv_id}")


def _start(env: dict[str, str], db_dir: str) -> Server:
    return Server({"BRANCHWISE_DATABASE_URL": f"sqlite:///{db_dir}/explorer.db", **env}).wait_ready()


@pytest.fixture(scope="module")
def site(browser, mock):
    with tempfile.TemporaryDirectory() as d:
        server = _start({"BRANCHWISE_UPSTREAM_BASE_URL": mock.url}, d)
        try:
            yield Site(server)
        finally:
            server.stop()


class Watched:
    """A page whose every request, console message and uncaught error is watched."""

    def __init__(self, browser, origin: str, allowed_errors: tuple[str, ...] = ()):
        self.origin = origin
        self.allowed = allowed_errors
        self.problems: list[str] = []
        self.requests: list[tuple[str, str | None]] = []  # (url, authorization header)
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        # only what is not for the server is intercepted (matched in the browser, so the
        # server's own requests do not wait on this process); every request is logged
        self.context.route(re.compile(rf"^(?!{re.escape(origin)}/)"), self._refuse)
        self.context.on("request", self._log)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught on the page: {e}"))

    def _refuse(self, route) -> None:
        self.problems.append(f"a request left the server: {route.request.method} {route.request.url}")
        route.abort()

    def _log(self, request) -> None:
        self.requests.append((request.url, request.headers.get("authorization")))

    def _console(self, message) -> None:
        if message.type in ("error", "warning") and not any(a in message.text for a in self.allowed):
            self.problems.append(f"console {message.type}: {message.text}")

    def close(self) -> None:
        self.context.close()
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture
def watch(browser, site):
    opened: list[Watched] = []

    def open_page(origin: str = site.url, allowed_errors: tuple[str, ...] = ()) -> Watched:
        w = Watched(browser, origin, allowed_errors)
        opened.append(w)
        return w

    yield open_page
    for w in opened:
        w.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def open_conversation(page, site: Site, conv_id: str) -> None:
    page.goto(f"{site.url}/conversations/{conv_id}")
    expect(page.locator("#tree .row").first).to_be_visible()
    page.wait_for_function("() => document.body.dataset.ready === 'true'")


def row(page, item_id: str):
    return page.locator(f'#tree .row[data-item-id="{item_id}"]')


def act(page, item_id: str, action: str) -> None:
    row(page, item_id).locator(".card .meta").click()
    expect(row(page, item_id)).to_have_class(_has("selected"))
    row(page, item_id).locator(f'.actions [data-action="{action}"]').click()


def _has(cls: str):
    return re.compile(rf"(^|\s){cls}(\s|$)")


def branched(site: Site, title: str) -> dict:
    """A conversation with every kind of branch: n alternatives, a branch through
    previous_response_id, a tool call and its output, and a fork that went on."""
    conv = site.sdk.conversations.create(metadata={"title": title}, items=[
        {"type": "message", "role": "system", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": "Plan a **day** in Paris:\n\n- museums\n- food"},
    ])
    r1 = site.sdk.responses.create(model=MODEL, conversation=conv.id, input="Make it cheap",
                                   extra_body={"n": 2})
    site.post(f"/v1/conversations/{conv.id}/items", {"items": [
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear"}'},
    ]})
    r2 = site.sdk.responses.create(model=MODEL, conversation=conv.id, input="Thanks, and `code`:\n```\nok()\n```")
    alt = r1.model_extra["alternatives"][0]
    r3 = site.sdk.responses.create(model=MODEL, previous_response_id=alt["id"], input="Another way")
    fork = site.post(f"/v1/conversations/{conv.id}/fork", {"metadata": {"title": f"{title} fork"}})
    r4 = site.sdk.responses.create(model=MODEL, conversation=fork["id"], input="On the fork")
    return {"id": conv.id, "r1": r1, "alt": alt, "r2": r2, "r3": r3, "fork": fork["id"], "r4": r4}


def text_of(item: dict) -> str:
    if item["type"] == "message":
        return " ".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
    if item["type"] == "function_call":
        return item["name"]
    if item["type"] == "function_call_output":
        return " ".join(json.loads(item["output"]).values())
    return ""


# ---------------------------------------------------------------- the tests


def test_deep_link_draws_every_item(site, watch):
    conv = branched(site, "Every item")
    page = watch().page
    open_conversation(page, site, conv["id"])
    tree = site.tree(conv["id"])
    # every node of the tree is one element carrying its item's id, the forks' items included
    drawn = page.eval_on_selector_all("#tree [data-item-id]", "els => els.map(e => [e.dataset.itemId, e.dataset.node])")
    assert sorted(map(tuple, drawn)) == sorted((r["id"], r["node"]) for r in tree["data"])
    assert conv["r4"].output[-1].id in {i for i, _ in drawn}
    # every message's text can be read on the page, markdown rendered, tools shown as such
    page.click("#unfold-all")
    for r in tree["data"]:
        text = text_of(r["item"])
        inner = row(page, r["id"]).first.inner_text()
        for word in text.replace("**", "").replace("`", "").split():
            if word.strip("-:") and word not in ("```",):
                assert word.strip("`") in inner, (word, inner)
    first = tree["data"][1]
    assert row(page, first["id"]).locator(".md strong").inner_text() == "day"
    assert row(page, first["id"]).locator(".md li").all_inner_texts() == ["museums", "food"]
    call = next(r for r in tree["data"] if r["type"] == "function_call")
    assert row(page, call["id"]).locator(".tool-kind").inner_text().lower() == "call"
    assert '"city": "Paris"' in row(page, call["id"]).locator("pre").inner_text()
    # the head's path is highlighted, and nothing else
    on_head = page.eval_on_selector_all("#tree .row.on-head", "els => els.map(e => e.dataset.node)")
    assert on_head == site.head_path(conv["id"])
    assert page.eval_on_selector_all("#tree .row.is-head", "els => els.map(e => e.dataset.itemId)") \
        == [conv["r2"].output[-1].id]
    assert page.locator(".tree-stats").inner_text().startswith(f"{len(tree['data'])} items")
    shot(page, "conversation")
    # an unknown conversation is said to be unknown (its 404s are the only console errors)
    other = watch(allowed_errors=("404",)).page
    other.goto(f"{site.url}/conversations/conv_nope")
    expect(other.locator(".notice")).to_contain_text("no conversation conv_nope")


def test_set_head_and_fork(site, watch):
    conv = branched(site, "Head and fork")
    page = watch().page
    open_conversation(page, site, conv["id"])
    # make an alternative the head: the API says so, the page highlights its path
    target = conv["r3"].output[-1].id
    act(page, target, "head")
    expect(row(page, target)).to_have_class(_has("is-head"))
    assert site.conversation(conv["id"])["head"] == target
    on_head = page.eval_on_selector_all("#tree .row.on-head", "els => els.map(e => e.dataset.node)")
    assert on_head == site.head_path(conv["id"])
    shot(page, "head-moved")
    # fork at an item of the head's path: a new conversation, its page opened
    on_path_item = page.eval_on_selector_all("#tree .row.on-head", "els => els.map(e => e.dataset.itemId)")[1]
    act(page, on_path_item, "fork")
    page.wait_for_url(lambda url: "/conversations/" in url and conv["id"] not in url)
    fork_id = page.url.rsplit("/", 1)[1]
    fork = site.conversation(fork_id)
    assert fork["forked_from"] == {"conversation_id": conv["id"], "item_id": on_path_item}
    assert fork["head"] == on_path_item and fork["metadata"]["title"] == "Head and fork (fork)"
    expect(row(page, on_path_item)).to_have_class(_has("is-head"))
    expect(page.locator(".forked a")).to_have_text(conv["id"])
    # fork at an item off the fork's path: the new one's head is that item
    off = conv["r2"].output[-1].id
    act(page, off, "fork")
    page.wait_for_url(lambda url: fork_id not in url and conv["id"] not in url)
    second = site.conversation(page.url.rsplit("/", 1)[1])
    assert second["head"] == off
    # the original is untouched by both forks
    assert site.conversation(conv["id"])["head"] == target
    shot(page, "forked")


def test_two_branch_parallel_send_streams_side_by_side(site, watch):
    conv = site.sdk.conversations.create(metadata={"title": "Parallel"}, items=[
        {"type": "message", "role": "user", "content": "Hello"}])
    page = watch().page
    open_conversation(page, site, conv.id)
    page.fill("#model", MODEL)
    page.select_option("#branches", "2")
    page.fill("#message", "Two ways please [[words=24]] [[chunk_delay=0.03]]")
    page.click("#send")
    # both alternatives are on the page and growing at the same time
    page.wait_for_function("""() => {
        const s = [...document.querySelectorAll('.streams .stream')];
        return s.length === 2 && s.every(c => c.dataset.state === 'streaming'
                                        && c.querySelector('.stream-body').textContent.length > 0);
    }""")
    shot(page, "streaming")
    cards = page.locator(".streams .stream")
    for i in range(2):
        expect(cards.nth(i)).to_have_attribute("data-state", "completed")
    expect(page.locator(".streams")).to_have_attribute("data-state", "done")
    # what streamed is what was stored; model, tokens and latency shown for each
    for i in range(2):
        card = cards.nth(i)
        stored = site.sdk.responses.retrieve(card.get_attribute("data-response-id"))
        assert card.locator(".stream-body").inner_text().strip() == stored.output_text
        assert card.locator(".stream-head").inner_text().count(stored.model) == 1
        stats = card.locator(".stats").inner_text()
        assert f"{stored.usage.input_tokens} in · {stored.usage.output_tokens} out tokens" in stats
        assert "first token" in stats and stats.endswith(" ms")
    assert cards.nth(1).locator(".stream-body").inner_text().split()[2] == "alt1"  # "[3 messages] alt1 w1 ..."
    # the tree shows both, under one shared input; alternative 0 holds the head
    tree = site.tree(conv.id)
    assert page.locator("#tree [data-item-id]").count() == len(tree["data"]) == 4
    first, second = (cards.nth(i).get_attribute("data-item") for i in range(2))
    assert site.conversation(conv.id)["head"] == first
    expect(cards.nth(0)).to_have_class(_has("is-head"))
    # pick the second: the head moves there
    cards.nth(1).locator("[data-pick]").click()
    expect(cards.nth(1)).to_have_class(_has("is-head"))
    assert site.conversation(conv.id)["head"] == second
    expect(row(page, second)).to_have_class(_has("is-head"))
    shot(page, "parallel-picked")
    # continue from an earlier item: the next message hangs under it
    act(page, tree["data"][0]["id"], "continue")
    expect(page.locator(".base-chip")).to_contain_text(tree["data"][0]["id"])
    page.select_option("#branches", "1")
    page.fill("#message", "From the start")
    page.click("#send")
    expect(page.locator(".streams .stream").first).to_have_attribute("data-state", "completed")
    nodes = {r["node"]: r for r in site.tree(conv.id)["data"]}
    path = [nodes[n]["id"] for n in site.head_path(conv.id)]
    assert path[0] == tree["data"][0]["id"] and len(path) == 3
    expect(page.locator(".base-chip")).to_be_hidden()


def test_a_failed_send_says_so(site, watch):
    """The model fails: each branch's card says why, offers nothing to continue with, and the
    conversation's head stays where it was."""
    conv = site.sdk.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi"}])
    head = site.conversation(conv.id)["head"]
    page = watch().page
    open_conversation(page, site, conv.id)
    page.fill("#model", MODEL)
    page.select_option("#branches", "2")
    page.fill("#message", "Break [[fail=503]]")
    page.click("#send")
    cards = page.locator(".streams .stream")
    for i in range(2):
        expect(cards.nth(i)).to_have_attribute("data-state", "failed")
        expect(cards.nth(i).locator(".stream-body")).to_contain_text("Failed:")
        expect(cards.nth(i).locator("[data-pick]")).to_be_disabled()
    assert site.conversation(conv.id)["head"] == head
    shot(page, "failed")


HOSTILE = (
    "<script>window.__pwned = 1</script> plain words\n\n"
    '<img src="x" onerror="window.__pwned = 2"> <img src="http://evil.example/pixel.png">\n\n'
    "[click me](javascript:window.__pwned=3) and <a href=\"javascript:window.__pwned=4\">this</a>\n\n"
    "![remote](http://evil.example/tracker.png) <iframe src=\"http://evil.example/\"></iframe>\n\n"
    '<svg onload="window.__pwned = 5"></svg> <div style="position:fixed;inset:0">cover</div>'
)


def test_hostile_message_stays_inert(site, watch):
    conv = site.sdk.conversations.create(metadata={"title": "Hostile"}, items=[
        {"type": "message", "role": "user", "content": HOSTILE},
        {"type": "message", "role": "assistant", "content": HOSTILE},
    ])
    page = watch().page
    page.add_init_script("window.__pwned = undefined")
    open_conversation(page, site, conv.id)
    bodies = page.locator("#tree .card .body")
    assert page.locator("#tree .row").count() == 2
    # shown as the text it is
    for i in range(2):
        text = page.locator("#tree .row").nth(i).inner_text()
        assert "<script>window.__pwned = 1</script> plain words" in text
        assert 'onerror="window.__pwned = 2"' in text and "<iframe" in text and "click me" in text
    # and none of it is markup that can act
    assert bodies.locator("script, iframe, svg, img, [onerror], [onload], [style]").count() == 0
    hrefs = bodies.locator("a[href]").evaluate_all("els => els.map(a => a.getAttribute('href'))")
    assert all(h.startswith("http") for h in hrefs), hrefs
    for link in bodies.locator("a[href]").all():  # the remote image became a link, opened elsewhere
        assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")
    for link in bodies.locator("a:not([href])").all():  # links whose address was dropped do nothing
        link.click()
    page.locator("#tree .row").first.locator(".card .meta").click()
    page.wait_for_timeout(300)  # anything that was going to run has run
    assert page.evaluate("window.__pwned") is None
    shot(page, "hostile")


def test_conversation_list_newest_first_and_filtered(site, watch):
    run = uuid.uuid4().hex[:8]
    made = [site.sdk.conversations.create(metadata={"title": f"{word} list test", "run": run})
            for word in ("alpha", "beta", "gamma")]
    page = watch().page
    page.goto(site.url + "/")
    expect(page.locator("#conversations .conv").first).to_be_visible()
    newest = site.get("/v1/conversations", limit=10)["data"]
    shown = page.eval_on_selector_all("#conversations .conv", "els => els.map(e => e.dataset.conversationId)")
    assert shown[:10] == [c["id"] for c in newest]
    assert shown[0] == made[-1].id
    # a metadata filter goes to the server; a word filters on the title
    page.fill("#filter", f"run={run}")
    expect(page.locator("#conversations .conv")).to_have_count(3)
    assert page.eval_on_selector_all("#conversations .conv", "els => els.map(e => e.dataset.conversationId)") \
        == [c.id for c in reversed(made)]
    page.fill("#filter", f"run={run} beta")
    expect(page.locator("#conversations .conv")).to_have_count(1)
    expect(page.locator("#conversations .conv .title")).to_have_text("beta list test")
    shot(page, "list")
    page.click("#conversations .conv a")
    page.wait_for_url(f"**/conversations/{made[1].id}")
    expect(page.locator(".conv-head h1")).to_have_text("beta list test")
    page.go_back()
    expect(page.locator("#filter")).to_have_value(f"run={run} beta")
    # a new conversation from the list, and its first message
    page.fill(".new-title", f"delta {run}")
    page.click("#new-conversation")
    page.wait_for_url("**/conversations/conv_*")
    expect(page.locator(".notice")).to_contain_text("no items yet")
    conv_id = page.url.rsplit("/", 1)[1]
    assert site.conversation(conv_id)["metadata"] == {"title": f"delta {run}"}
    page.fill("#model", MODEL)
    page.fill("#message", "First words")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#tree .row")).to_have_count(2)
    expect(page.locator(".notice")).to_be_hidden()
    assert [r["item"]["content"][0]["text"] for r in site.tree(conv_id)["data"]] == [
        "First words", "[1 messages] Echo: First words"]


def test_api_key_prompted_kept_and_sent_only_here(browser, mock, watch):
    with tempfile.TemporaryDirectory() as d:
        server = _start({"BRANCHWISE_UPSTREAM_BASE_URL": mock.url, "BRANCHWISE_API_KEY": "sekrit"}, d)
        try:
            watched = watch(origin=server.url, allowed_errors=("401",))
            page = watched.page
            page.goto(server.url + "/")
            dialog = page.locator("#key-dialog")
            expect(dialog).to_be_visible()
            expect(dialog).to_contain_text("asks for an API key")
            page.fill("#key-input", "wrong")
            page.click("#key-save")
            expect(page.locator("#key-reason")).to_contain_text("refused the API key")
            page.fill("#key-input", "sekrit")
            page.click("#key-save")
            expect(dialog).to_be_hidden()
            expect(page.locator(".list-status")).not_to_contain_text("API key")
            assert page.evaluate("localStorage.getItem('branchwise.apiKey')") == "sekrit"
            page.reload()  # kept across loads
            expect(page.locator("h1")).to_have_text("Conversations")
            expect(dialog).to_be_hidden()
            sent = [(u, a) for u, a in watched.requests if a]
            assert sent and all(u.startswith(server.url + "/v1/") for u, _ in sent)
            assert {a for _, a in sent} <= {"Bearer wrong", "Bearer sekrit"}
        finally:
            server.stop()


def test_thousand_items_fifty_branches_render_fast(site, watch):
    """1,000 items in 50 branches: the page draws them all in under a second, opened or
    reloaded, and answers a click on a row, or unfolding every run, at once."""
    main = [{"type": "message", "role": "user" if i % 2 == 0 else "assistant", "content": f"main {i} *text*"}
            for i in range(216)]
    conv = site.sdk.conversations.create(metadata={"title": "Big tree"}, items=main[:16])
    for start in range(16, 216, 20):  # (20 items a request at most, as OpenAI's)
        site.post(f"/v1/conversations/{conv.id}/items", {"items": main[start:start + 20]})
    path = [it.id for it in site.sdk.conversations.items.list(conv.id, order="asc", limit=100)]  # (every page)
    assert len(path) == 216
    for b in range(49):
        site.post(f"/v1/conversations/{conv.id}/head", {"item_id": path[b * 4 + 3]})
        site.post(f"/v1/conversations/{conv.id}/items", {"items": [
            {"type": "message", "role": "user", "content": f"branch {b} item {k}"} for k in range(16)]})
    site.post(f"/v1/conversations/{conv.id}/head", {"item_id": path[-1]})
    tree = site.tree(conv.id)
    assert len(tree["data"]) == 1000
    page = watch().page
    # from navigation start (performance.now()'s zero) to the tree drawn and a frame painted, on
    # fresh loads; then from a click on "Reload" to the same. The best of three: the machine that
    # runs the tests is shared, and its stalls are not the page's.
    opened = []
    for _ in range(3):
        page.goto(f"{site.url}/conversations/{conv.id}")
        opened.append(page.evaluate(DRAWN))
    assert page.locator("#tree [data-item-id]").count() == 1000
    assert page.locator(".tree-stats").inner_text() == "1000 items · 50 branches"
    reloads = [page.evaluate(RELOADED) for _ in range(3)]
    timings = page.evaluate(RESPONSIVE)
    print(f"\n1,000 items / 50 branches, ms: open {opened}, reload {reloads}, then {timings}")
    assert min(opened) < 1000 and min(reloads) < 1000, (opened, reloads)
    assert timings["select"] < 200 and timings["unfold"] < 500, timings
    shot(page, "big-tree")


_FRAME = "const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));"
_DRAWN = """
    const tree = () => document.getElementById('tree');
    const deadline = performance.now() + 10000;
    while ((!tree() || tree().dataset.renderMs === undefined) && performance.now() < deadline) {
        await new Promise(r => setTimeout(r, 2));
    }
    await frame();"""
DRAWN = f"async () => {{ {_FRAME} {_DRAWN} return performance.now(); }}"
RELOADED = f"""async () => {{ {_FRAME}
    delete document.getElementById('tree').dataset.renderMs;
    const t0 = performance.now();
    document.getElementById('reload').click();
    {_DRAWN}
    return performance.now() - t0;
}}"""
RESPONSIVE = f"""async () => {{ {_FRAME}
    const shown = document.querySelectorAll('#tree .row:not(.folded)');
    const row = shown[Math.floor(shown.length / 2)];
    const t1 = performance.now();
    row.querySelector('.card .meta').click();
    await frame();
    const select = performance.now() - t1;
    const t2 = performance.now();
    document.getElementById('unfold-all').click();
    await frame();
    return {{select, unfold: performance.now() - t2}};
}}"""
