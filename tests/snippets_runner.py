"""Runs a document's Python snippets in order, in one namespace, as a reader would paste them
into one session (`python -m asyncio`): top-level `await` allowed, `client` an `AsyncOpenAI` on
the server that OPENAI_BASE_URL names. Used by tests/test_snippets.py in a subprocess:
`python tests/snippets_runner.py BLOCKS.json`, each block {"name", "code"}."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import sys


async def main(blocks: list[dict]) -> None:
    from openai import AsyncOpenAI

    namespace: dict = {"__name__": "__snippets__", "asyncio": asyncio,
                       "client": AsyncOpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="anything")}
    for block in blocks:
        print(f"--- {block['name']}", flush=True)
        code = compile(block["code"], block["name"], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)  # noqa: S307 - the project's own documentation
        if inspect.iscoroutine(result):
            await result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        asyncio.run(main(json.load(f)))
