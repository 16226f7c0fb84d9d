"""Ids: OpenAI's shape, time-ordered, and never repeated, though their random digits come from a
buffer (each part handed out once, the buffer emptied in a forked child)."""

from __future__ import annotations

import os
import re
import threading

from branchwise.core import ids


def test_ids_have_openai_shape_and_sort_by_time():
    made = [ids.new_id("resp") for _ in range(3000)]  # past several refills of the buffer
    assert all(re.fullmatch(r"resp_[0-9a-f]{48}", i) for i in made)
    assert len(set(made)) == len(made)
    assert [i[:19] for i in made] == sorted(i[:19] for i in made)  # the time prefix never goes back
    nodes = [ids.new_node() for _ in range(3000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", n) for n in nodes)
    assert len(set(nodes)) == len(nodes)


def test_random_digits_are_not_shared_between_threads():
    out: list[list[str]] = [[] for _ in range(4)]

    def make(k: int) -> None:
        out[k] = [ids.new_id("msg")[19:] for _ in range(2000)]

    threads = [threading.Thread(target=make, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    digits = [d for part in out for d in part]
    assert len(set(digits)) == len(digits) == 8000


def test_a_forked_child_does_not_repeat_its_parents_digits():
    ids.new_id("resp")  # the parent's buffer is full
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(w, "".join(ids.new_id("resp")[19:] for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        child = fh.read()
    os.waitpid(pid, 0)
    parent = "".join(ids.new_id("resp")[19:] for _ in range(50))
    child_ids = {child[k:k + 34] for k in range(0, len(child), 34)}
    parent_ids = {parent[k:k + 34] for k in range(0, len(parent), 34)}
    assert len(child_ids) == 50
    assert not child_ids & parent_ids
