"""What a `python -m bench.phase --trace` trace says (`bench/trace/sitecustomize.py` writes it):
each step of the stored responses (mean, p50, p90, p99, and its mean in the slowest 1%), each
kind of grouped statement (count, size, duration, how busy), the garbage collector's passes, and
where in time the slowest 1% of the responses started (100 ms buckets: bunched means a stall)."""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter

STEPS = (("before the read", "start0", "read0"), ("conversation read", "read0", "read1"),
         ("read -> model", "read1", "model0"), ("model call", "model0", "model1"),
         ("model -> commit", "model1", "commit0"), ("commit", "commit0", "commit1"),
         ("commit -> reply", "commit1", "reply1"), ("in all (validation to reply)", "start0", "reply1"))


def _pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def report(path: str) -> str:
    d = json.load(open(path))
    reqs = [r for r in d["requests"] if "commit1" in r and "model1" in r]
    for r in reqs:  # (no conversation read: a request without a conversation)
        r.setdefault("read0", r["start0"])
        r.setdefault("read1", r["read0"])
    out = [f"{len(reqs)} stored responses traced (warm-up included)"]
    if not reqs:
        return out[0]
    t0 = min(r["start0"] for r in reqs)
    reqs.sort(key=lambda r: r["reply1"] - r["start0"])
    slow = reqs[int(0.99 * len(reqs)):]
    out.append(f"{'step, ms':30s} {'mean':>7s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'slowest 1%':>11s}")
    for name, a, b in STEPS:
        xs = sorted(1000 * (r[b] - r[a]) for r in reqs)
        out.append(f"{name:30s} {statistics.mean(xs):7.2f} {_pct(xs, .5):7.2f} {_pct(xs, .9):7.2f} "
                   f"{_pct(xs, .99):7.2f} {statistics.mean(1000 * (r[b] - r[a]) for r in slow):11.2f}")
    for kind in sorted({g[0] for g in d["groups"]}):
        gs = sorted((g for g in d["groups"] if g[0] == kind), key=lambda g: g[1])
        durs = sorted(1000 * (g[2] - g[1]) for g in gs)
        span = max(g[2] for g in gs) - gs[0][1] or 1
        out.append(f"{kind}: {len(gs)} ({len(gs) / span:.0f}/s), size mean {statistics.mean(g[3] for g in gs):.1f} "
                   f"max {max(g[3] for g in gs)}, ms p50 {_pct(durs, .5):.2f} p90 {_pct(durs, .9):.2f} "
                   f"p99 {_pct(durs, .99):.2f} max {durs[-1]:.1f}, busy {sum(durs) / 1000 / span:.0%}")
    passes = [(g, 1000 * (b - a)) for g, a, b in d["gc"] if b >= t0]
    for gen in sorted({g for g, _ in passes}):
        xs = [ms for g, ms in passes if g == gen]
        out.append(f"gc generation {gen}: {len(xs)} passes, mean {statistics.mean(xs):.2f} ms, max {max(xs):.2f}")
    if not passes:
        out.append("gc: no pass while responses were traced")
    started = Counter(int((r["start0"] - t0) * 10) for r in reqs)
    bunched = Counter(int((r["start0"] - t0) * 10) for r in slow)
    out.append("slowest 1% by start time (s: slow/all started in those 100 ms): "
               + " ".join(f"{k / 10:.1f}: {n}/{started[k]}" for k, n in sorted(bunched.items())))
    return "\n".join(out)


if __name__ == "__main__":
    print(report(sys.argv[1]))
