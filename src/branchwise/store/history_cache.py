"""The history cache, bounded, in memory: node -> the Chat Completions messages of the path
root..node, comma-joined, exactly as the path query builds them from the database.

Correct across processes and without invalidation because a node never changes: items are only
ever inserted (a delete re-hangs copies under new nodes and leaves the old ones alone), so the
path to a node, and what it reads as, is fixed from the moment the node is written. What moves
is a conversation's head, which is always read from the database; only the walk behind it is
saved. A response's commit puts the paths of its new last nodes in the cache, so the next turn
on that branch costs one short query instead of a recursive walk."""

from __future__ import annotations

from collections import OrderedDict

ENTRY_OVERHEAD = 200  # bytes per entry beyond the value: the key, the bytes object, the dict's node


class PathCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.max_entry = max_bytes // 8  # one very long history does not push out everything else
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, node: str) -> bytes | None:
        value = self._data.get(node)
        if value is not None:
            self._data.move_to_end(node)
        return value

    def put(self, node: str, value: bytes) -> None:
        if len(value) + ENTRY_OVERHEAD > self.max_entry:
            return
        old = self._data.pop(node, None)
        if old is not None:
            self._bytes -= len(old) + ENTRY_OVERHEAD
        self._data[node] = value
        self._bytes += len(value) + ENTRY_OVERHEAD
        while self._bytes > self.max_bytes:
            _, dropped = self._data.popitem(last=False)
            self._bytes -= len(dropped) + ENTRY_OVERHEAD


def extend(history: bytes, chats: list[bytes | None]) -> bytes:
    """`history` followed by the non-empty messages `chats`, joined as the path query joins them."""
    parts = [history] if history else []
    parts += [c for c in chats if c]
    return b",".join(parts)
