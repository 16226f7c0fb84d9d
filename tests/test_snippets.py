"""The Python snippets of README.md and docs/*.md run, so that they cannot rot.

A fenced block's info string says how: `python` runs against a server on the mock upstream,
`python embedded` against a server on the embedded model (marked `embedded`), `python norun`
is a fragment that is not run (it names things the page does not define). A page's blocks run
in order in one session (tests/snippets_runner.py): later blocks use what earlier ones made, and
`client` is an AsyncOpenAI on the server. The server's address replaces the pages'
`http://127.0.0.1:8000`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT, Server

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```$", re.S | re.M)
KINDS = {"": "mock", "embedded": "embedded", "norun": None}
RUN_TIMEOUT_S = 240


def _blocks(kind: str) -> list[tuple[str, list[dict]]]:
    out = []
    for page in PAGES:
        blocks = []
        for n, m in enumerate(FENCE.finditer(page.read_text()), 1):
            info = m.group(1).strip()
            assert info in KINDS, f"{page.name}: block {n} has the info string 'python {info}'; use one of {list(KINDS)}"
            if KINDS[info] == kind:
                line = page.read_text()[:m.start()].count("\n") + 1
                blocks.append({"name": f"{page.relative_to(ROOT)}:{line}", "code": m.group(2)})
        if blocks:
            out.append((str(page.relative_to(ROOT)), blocks))
    return out


def _run(server: Server, blocks: list[dict], tmp_path) -> None:
    code = [{**b, "code": b["code"].replace("http://127.0.0.1:8000", server.url)} for b in blocks]
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(code))
    env = {**os.environ, "OPENAI_BASE_URL": f"{server.url}/v1", "OPENAI_API_KEY": "anything"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "snippets_runner.py"), str(path)], env=env,
                       capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}\n--- server ---\n{server.output()[-3000:]}"


@pytest.fixture
def snippet_server(tmp_path):
    servers = []

    def start(env: dict[str, str]) -> Server:
        s = Server({"BRANCHWISE_DATABASE_URL": f"sqlite:///{tmp_path / 'snippets.db'}", **env})
        servers.append(s)
        return s.wait_ready()

    yield start
    for s in servers:
        s.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("page,blocks", _blocks("mock"), ids=[p for p, _ in _blocks("mock")])
def test_snippets_on_the_mock_upstream(page, blocks, snippet_server, mock, tmp_path):
    _run(snippet_server({"BRANCHWISE_UPSTREAM_BASE_URL": mock.url}), blocks, tmp_path)


@pytest.mark.e2e
@pytest.mark.embedded
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("page,blocks", _blocks("embedded"), ids=[p for p, _ in _blocks("embedded")])
def test_snippets_on_the_embedded_model(page, blocks, snippet_server, tmp_path):
    _run(snippet_server({}), blocks, tmp_path)


def test_every_python_block_is_run_or_marked():
    counted = sum(len(b) for kind in ("mock", "embedded") for _, b in _blocks(kind))
    fences = sum(len(FENCE.findall(p.read_text())) for p in PAGES)
    norun = sum(1 for p in PAGES for m in FENCE.finditer(p.read_text()) if m.group(1).strip() == "norun")
    assert counted + norun == fences and counted > 0
