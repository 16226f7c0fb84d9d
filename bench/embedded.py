"""(h) The embedded model: what batching and prefix reuse deliver, against llama.cpp's own limit.

`python -m bench.embedded [--smoke] [--repeat N]` runs this section alone; `python -m bench` runs
it after the database sections (`--skip-embedded` leaves it out).

- llama.cpp's raw batched decode rate, measured here in this process through its own API, with
  a context built as the server builds its own (the same threads, sequences, streams and batch
  size): S sequences after one prompt, `TOKENS` steps of one token each, nothing sampled. It
  is the upper limit of what S sequences can deliver on this machine right now.
- The delivered rate through the HTTP API of `branchwise serve` with no upstream (the embedded
  model): S concurrent streamed `POST /v1/responses` (S = 1, 2, 4), and one request with `n`
  = 2 and 4, each with `max_output_tokens` = `TOKENS`: output tokens of all of them over the
  wall time from sending to the last terminal event (prompt reading, sampling, HTTP, storing
  included). Raw and delivered phases alternate, so both see the same machine.
- Time to the first output delta of each of two concurrent responses.
- A follow-up (`previous_response_id`) on a cached ~1,500-token prefix (instructions and one
  turn), against the same request cold (another prefix of the same length, never seen): time
  to the first output delta, and the `cached_tokens` the warm one reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import orjson

from bench.loadgen import Server, free_port, machine_ticks, rss_kib

TOKENS = 96
CONCURRENT = (1, 2, 4)
ALTERNATIVES = (2, 4)
PREFIX_TOKENS = 1500
REPEAT = 3
STORY = "Write a long story about a dragon who learns to bake bread, with many details."
SENTENCE = ("Rule {i}: the bakery opens at seven, bakes rye and wheat loaves, keeps the ovens clean, "
            "and greets every customer by name with a warm smile. ")


# ------------------------------------------------------------------ llama.cpp, directly


class Raw:
    """llama.cpp's own batched decoding, with the context the server makes."""

    def __init__(self, parallel: int, window: int) -> None:
        import llama_cpp as L

        from branchwise.backends.local.model import (
            BATCH_TOKENS,
            default_model_path,
            default_threads,
            quiet_llama_logs,
        )

        quiet_llama_logs()
        L.llama_backend_init()
        self.L = L
        self.threads = default_threads()
        self.model = L.llama_model_load_from_file(default_model_path().encode(), L.llama_model_default_params())
        self.vocab = L.llama_model_get_vocab(self.model)
        p = L.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.kv_unified = parallel * window, parallel, False
        p.n_batch = p.n_ubatch = BATCH_TOKENS
        p.n_threads = p.n_threads_batch = self.threads
        self.ctx = L.llama_init_from_model(self.model, p)
        self.batch = L.llama_batch_init(BATCH_TOKENS, 0, 1)
        text = f"<|im_start|>user\n{STORY}<|im_end|>\n<|im_start|>assistant\n".encode()
        buf = (L.llama_token * 256)()
        self.prompt = list(buf[: L.llama_tokenize(self.vocab, text, len(text), buf, 256, True, True)])

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def rate(self, sequences: int, steps: int) -> float:
        """Tokens per second of `sequences` decoding together for `steps` steps."""
        L, n = self.L, len(self.prompt)
        mem = L.llama_get_memory(self.ctx)
        L.llama_memory_clear(mem, True)
        self._decode([(t, i, 0, i == n - 1) for i, t in enumerate(self.prompt)])
        for s in range(1, sequences):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)  # (the copies are made before the next decode)
        t0 = time.perf_counter()
        for k in range(steps):
            self._decode([(100 + k, n + k, s, True) for s in range(sequences)])
        return sequences * steps / (time.perf_counter() - t0)

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


# ------------------------------------------------------------------ through the HTTP API


async def _stream(client, body: dict) -> dict:
    """One streamed POST /v1/responses: first-delta time (s after sending), output tokens of all
    its alternatives, cached prompt tokens, and when it ended."""
    t0 = time.perf_counter()
    first, tokens, cached, ids = None, 0, 0, []
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/responses: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = orjson.loads(line[6:])
            kind = event.get("type")
            if kind == "response.output_text.delta" and first is None:
                first = time.perf_counter() - t0
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                resp = event["response"]
                if kind == "response.failed":
                    raise RuntimeError(f"response failed: {resp.get('error')}")
                usage = resp.get("usage") or {}
                tokens += usage.get("output_tokens", 0)
                cached = max(cached, (usage.get("input_tokens_details") or {}).get("cached_tokens", 0))
                ids.append(resp["id"])
    return {"first_s": first, "tokens": tokens, "cached": cached, "end": time.perf_counter(), "ids": ids}


async def delivered(client, concurrent: int, n: int, tokens: int) -> dict:
    body = {"model": "smollm", "input": STORY, "max_output_tokens": tokens, "temperature": 0.8, "n": n}
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_stream(client, body) for _ in range(concurrent)))
    wall = max(r["end"] for r in results) - t0
    total = sum(r["tokens"] for r in results)
    return {"rate": total / wall, "tokens": total, "wall_s": wall,
            "first_s": sorted(r["first_s"] for r in results if r["first_s"] is not None)}


def _instructions(sentences: int) -> str:
    return f"Session {secrets.token_hex(6)}. You answer questions about a bakery.\n" + "".join(
        SENTENCE.format(i=i) for i in range(sentences))


async def _sentences_for(client, target: int) -> int:
    """How many sentences make instructions of about `target` tokens (counted by the server)."""
    async def count(k: int) -> int:
        r = await client.post("/v1/responses/input_tokens", json={"model": "smollm", "instructions": _instructions(k),
                                                                   "input": "Q"})
        r.raise_for_status()
        return r.json()["input_tokens"]

    base, ten = await count(0), await count(10)
    return max(1, round((target - base) * 10 / max(1, ten - base)))


async def prefix_reuse(client, prefix_tokens: int, repeat: int) -> dict:
    sentences = await _sentences_for(client, prefix_tokens)
    q1, q2 = "When does the bakery open?", "Which loaves does it bake?"
    cold, warm, cached, input_tokens = [], [], [], 0
    for _ in range(repeat):
        instructions = _instructions(sentences)
        r = await client.post("/v1/responses", json={"model": "smollm", "instructions": instructions, "input": q1,
                                                     "max_output_tokens": 16, "temperature": 0})
        r.raise_for_status()
        first = r.json()
        answer = first["output"][0]["content"][0]["text"]
        w = await _stream(client, {"model": "smollm", "instructions": instructions, "input": q2,
                                   "previous_response_id": first["id"], "max_output_tokens": 16, "temperature": 0})
        c = await _stream(client, {"model": "smollm", "instructions": _instructions(sentences), "input": [
            {"role": "user", "content": q1}, {"role": "assistant", "content": answer},
            {"role": "user", "content": q2}], "max_output_tokens": 16, "temperature": 0})
        warm.append(w["first_s"])
        cold.append(c["first_s"])
        cached.append(w["cached"])
        got = await client.get(f"/v1/responses/{c['ids'][0]}")
        input_tokens = got.json()["usage"]["input_tokens"]
    return {"input_tokens": input_tokens, "cold_first_s": median(cold), "warm_first_s": median(warm),
            "ratio": median(warm) / median(cold), "warm_cached_tokens": min(cached), "runs": repeat}


# ------------------------------------------------------------------ the section


async def _measure(port: int, raw: Raw, tokens: int, concurrent: tuple, alternatives: tuple, repeat: int,
                   prefix_tokens: int) -> dict:
    """Each delivered phase right after a raw phase of as many sequences: its ratio is to the
    machine of that moment. Ratios, rates and first-delta times are medians over `repeat`."""
    import httpx

    loop = asyncio.get_running_loop()
    phases = sorted([("concurrent", s) for s in concurrent] + [("n", s) for s in alternatives],
                    key=lambda p: (p[1], p[0]))
    runs: dict = {p: [] for p in phases}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        await delivered(client, 1, 1, 16)  # loads the model
        for _ in range(repeat):
            for kind, s in phases:
                limit = await loop.run_in_executor(None, raw.rate, s, tokens)
                d = await (delivered(client, s, 1, tokens) if kind == "concurrent" else delivered(client, 1, s, tokens))
                runs[(kind, s)].append({**d, "raw": limit, "ratio": d["rate"] / limit})
        out: dict = {"concurrent": {}, "n": {}}
        for (kind, s), rs in runs.items():
            entry = {"raw": median(r["raw"] for r in rs), "rate": median(r["rate"] for r in rs),
                     "ratio": median(r["ratio"] for r in rs), "ratios": [round(r["ratio"], 3) for r in rs],
                     "tokens": median(r["tokens"] for r in rs), "runs": len(rs)}
            if kind == "concurrent":
                entry["first_s"] = [median(r["first_s"][i] for r in rs) for i in range(s)]
            out[kind][s] = entry
        out["prefix"] = await prefix_reuse(client, prefix_tokens, max(1, repeat - 1))
    return out


def run(logs: Path, smoke: bool = False, repeat: int = REPEAT) -> dict:
    """Starts `branchwise serve` on the embedded model, measures, stops it."""
    tokens, concurrent, alternatives, prefix_tokens = TOKENS, CONCURRENT, ALTERNATIVES, PREFIX_TOKENS
    if smoke:
        tokens, concurrent, alternatives, prefix_tokens, repeat = 16, (1, 2), (2,), 150, 1
    from branchwise.settings import Settings

    fields = Settings.model_fields  # the server runs on the defaults (no BRANCHWISE_* reaches it)
    parallel, window = fields["local_parallel"].default, fields["local_n_ctx"].default
    port = free_port()
    venv_bin = Path(sys.executable).parent
    exe = [str(venv_bin / "branchwise")] if (venv_bin / "branchwise").exists() else [sys.executable, "-m", "branchwise"]
    (logs / "none.toml").write_text("")
    server = Server("branchwise-embedded", [*exe, "serve", "--host", "127.0.0.1", "--port", str(port)], port, logs,
                    cwd=str(logs), env={"BRANCHWISE_DATABASE_URL": f"sqlite:///{logs / 'embedded.db'}",
                                        "BRANCHWISE_CONFIG": str(logs / "none.toml")})
    b0, t0 = machine_ticks()
    time.sleep(1.0)
    b1, t1 = machine_ticks()
    raw = Raw(parallel, window)
    try:
        server.start()
        res = asyncio.run(asyncio.wait_for(
            _measure(port, raw, tokens, concurrent, alternatives, repeat, prefix_tokens), 1800))
        res["server_rss_mib"] = rss_kib(server.pids()) / 1024
    except BaseException:
        print(f"branchwise log tail:\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        raw.close()
    res["config"] = {"tokens": tokens, "repeat": repeat, "threads": raw.threads, "parallel": parallel,
                     "window": window, "prefix_tokens_target": prefix_tokens,
                     "busy_before_pct": 100 * (b1 - b0) / max(1, t1 - t0)}
    return res


def _f(x: float, nd: int = 1) -> str:
    return f"{x:,.{nd}f}"


def table(res: dict) -> str:
    c = res["config"]
    rows = []
    for kind, label in (("concurrent", "{s} concurrent"), ("n", "n={s} in one request")):
        for s, e in res[kind].items():
            first = ", ".join(_f(x * 1000, 0) for x in e.get("first_s", [])) or "-"
            rows.append([label.format(s=s), _f(e["raw"]), _f(e["rate"]), f"{e['ratio']:.2f}",
                         str(int(e["tokens"])), first])
    p = res["prefix"]
    lines = [
        "### (h) The embedded model: batched decoding and prefix reuse", "",
        f"SmolLM2-135M, {c['threads']} llama.cpp thread(s), {c['parallel']} sequences of {c['window']} tokens, "
        f"`max_output_tokens` {c['tokens']}; medians of {c['repeat']} runs, each delivered phase right after a raw "
        "one. Raw: llama.cpp decoding that many sequences together through its own API in this process "
        "(decode only); delivered: output tokens over wall time through the HTTP API (streamed, stored); "
        "ratio: the median of each run's delivered / raw.", "",
        "| load | llama.cpp raw tokens/s | delivered tokens/s | ratio | tokens | first delta ms |",
        "|---|---:|---:|---:|---:|---:|",
        *["| " + " | ".join(r) + " |" for r in rows], "",
        f"Follow-up on a cached {p['input_tokens']}-token prompt: first delta {_f(p['warm_first_s'] * 1000, 0)} ms "
        f"({p['warm_cached_tokens']} tokens cached) against {_f(p['cold_first_s'] * 1000, 0)} ms cold: "
        f"{p['ratio']:.2f}x (median of {p['runs']}). Server RSS at the end: {_f(res['server_rss_mib'], 0)} MiB "
        f"(model, {c['parallel']} x {c['window']} tokens of KV cache, SQLite). Machine "
        f"{c['busy_before_pct']:.0f}% busy before the section.",
    ]
    return "\n".join(lines)


def budget(res: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for kind, label in (("concurrent", "{s} concurrent"), ("n", "n={s}")):
        for s, e in res[kind].items():
            checks.append((f"[embedded] {label.format(s=s)}: delivered >= 80% of llama.cpp's raw rate",
                           e["ratio"] >= 0.8, f"{e['ratio']:.2f} ({_f(e['rate'])} of {_f(e['raw'])} tokens/s)"))
    two = res["concurrent"].get(2)
    if two:
        a, b = two["first_s"]
        checks.append(("[embedded] second of two concurrent: first token <= 2x the first's", b <= 2 * a,
                       f"{b / a:.2f}x ({_f(a * 1000, 0)} / {_f(b * 1000, 0)} ms)"))
    p = res["prefix"]
    checks.append((f"[embedded] follow-up on a cached {p['input_tokens']}-token prefix: first token <= 0.3x cold",
                   p["ratio"] <= 0.3, f"{p['ratio']:.2f}x"))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.embedded")
    ap.add_argument("--smoke", action="store_true", help="every figure, in phases too short to mean anything")
    ap.add_argument("--repeat", type=int, default=REPEAT)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="branchwise-embedded-"))
    res = run(logs, smoke=args.smoke, repeat=args.repeat)
    print(table(res))
    checks = budget(res)
    print("\n" + "\n".join(f"- {name}: {got} ({'met' if ok else 'MISSED'})" for name, ok, got in checks))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
