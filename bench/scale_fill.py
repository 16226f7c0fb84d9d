"""Branched conversations made up in bulk, as the API would have stored them, for the scale
benchmark (bench/scale.py).

Each conversation is a run of turns; a turn is one stored response: its input (a user message,
or a tool's output after a function call) hung under its base, and its output (an assistant
message, sometimes after a reasoning item, sometimes a function call) under its input. Most
turns continue from the head; some regenerate the last answer (a second response from the
same base) and some go back a few items and ask something else (an edited question): those
make the branches. The head ends at the last response's output. Turns per conversation are
long-tailed (mean ~9, a few in the hundreds); messages are words drawn from a Zipf-like
vocabulary, 20-600 characters for a user, 100-3,000 for an answer.

The items are `wire.items`' (their data and chat serialisations made by the same functions as
the API's), the bodies `wire.objects.response_object`'s, and the tree placement
`core.tree.place_tree`'s, through `Repository.import_conversations`: a bulk path for what POST
/v1/responses stores one at a time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

from branchwise.core.chat import Usage
from branchwise.core.ids import new_id
from branchwise.core.tree import ImportedConversation, ImportedResponse, NewItem
from branchwise.wire import items as witems
from branchwise.wire import models as m
from branchwise.wire.objects import response_object

REGENERATE = 0.08  # of turns after the first: a second answer from the same base
EDIT = 0.07  # of turns after the first: back a few items, another question
TOOL = 0.05  # of answers: a function call (the next input is its output)
REASONING = 0.15  # of answers: a reasoning item before the message
TIME0 = 1_767_225_600  # 2026-01-01


class Words:
    """Text from a made-up vocabulary of ~4,000 words, drawn Zipf-like (a few words very often)."""

    def __init__(self, rng: random.Random):
        syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "do", "an", "qui", "ser", "ph", "or", "ith", "em"]
        vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)})
        rng.shuffle(vocab)
        weights = [1 / (k + 1) for k in range(len(vocab))]
        # one long text to cut from: drawing word by word for millions of messages would dominate
        words = rng.choices(vocab, weights, k=400_000)
        for k in range(0, len(words), 17):
            words[k] += "."
        self.text = " ".join(words)
        self.rng = rng

    def about(self, chars: int) -> str:
        start = self.rng.randrange(0, len(self.text) - chars - 1)
        start = self.text.find(" ", start) + 1
        end = self.text.find(" ", start + chars)
        return self.text[start:end if end > 0 else None]

    def user(self) -> str:
        return self.about(int(min(600, max(20, self.rng.lognormvariate(4.6, 0.8)))))

    def answer(self) -> str:
        return self.about(int(min(3000, max(100, self.rng.lognormvariate(6.3, 0.7)))))


def turns(rng: random.Random) -> int:
    return min(300, max(1, int(rng.paretovariate(1.4) * 3.2)))


class Maker:
    def __init__(self, seed: int = 20):
        self.rng = random.Random(seed)
        self.words = Words(self.rng)
        self.made = 0  # responses made so far

    def conversation(self, n_turns: int | None = None, created: int | None = None) -> ImportedConversation:
        rng, words = self.rng, self.words
        conv_id = new_id("conv")
        req = m.CreateResponse(model="mock", conversation=conv_id, input="-")
        created = created if created is not None else TIME0 + rng.randrange(0, 30 * 86400)
        items: list[NewItem] = []
        parents: list[int | None] = []
        times: list[int] = []
        rids: list[str | None] = []
        responses: list[ImportedResponse] = []
        path: list[int] = []  # positions of the current branch's items, root first
        starts: list[int] = []  # len(path) when each turn on the current branch began
        pending_call: str | None = None  # a function call the next input answers
        question: str | None = None  # the last turn's, when it asked one
        t = created
        for turn in range(n_turns or turns(rng)):
            t += rng.randint(5, 600)
            r = rng.random()
            if turn and pending_call is None and question is not None and r < REGENERATE:
                path = path[:starts.pop()]  # the same question again, from the same base
            elif turn and pending_call is None and r < REGENERATE + EDIT and len(starts) >= 3:
                back = rng.randint(2, min(3, len(starts) - 1))
                path = path[:starts[-back]]  # back a few turns, another question
                del starts[-back:]
                question = words.user()
            else:
                question = None if pending_call is not None else words.user()
            starts.append(len(path))
            base = path[-1] if path else None
            rid = new_id("resp")
            if question is None:
                inp = witems.from_input(m.FunctionCallOutput(type="function_call_output", call_id=pending_call, output=words.user()))
                pending_call = None
            else:
                inp = witems.from_input(m.Message(role="user", content=question))
            out: list[NewItem] = []
            if rng.random() < REASONING:
                out.append(witems.output_reasoning(words.user()))
            if rng.random() < TOOL:
                call_id = "call_" + new_id("x")[2:26]
                out.append(witems.from_input(m.FunctionCall(type="function_call", call_id=call_id, name="lookup",
                                                            arguments=orjson.dumps({"q": words.about(30)}).decode())))
                pending_call = call_id
            else:
                out.append(witems.output_message(words.answer()))
            for it in (inp, *out):
                items.append(it)
                parents.append(path[-1] if path else None)
                times.append(t)
                rids.append(rid)
                path.append(len(items) - 1)
            in_tokens = sum(len(items[p].chat or b"") for p in path) // 4
            out_tokens = sum(len(it.data) for it in out) // 4
            body = orjson.dumps(response_object(req, id=rid, created_at=t, status="completed",
                                                output=[it.wire for it in out], completed_at=t + 2,
                                                usage=Usage(input_tokens=in_tokens, output_tokens=out_tokens)))
            responses.append(ImportedResponse(id=rid, created_at=t, base=base, input_last=len(items) - 1 - len(out),
                                              input_count=1, last=len(items) - 1, body=body))
        self.made += len(responses)
        return ImportedConversation(conv_id=conv_id, tree=conv_id, metadata={}, created_at=created, items=items,
                                    parents=parents, item_created=times, head=path[-1] if path else None,
                                    response_ids=rids, responses=responses)

    def batches(self, responses: int, batch: int = 4000) -> Iterator[list[ImportedConversation]]:
        """Conversations of `responses` responses in all (about), in batches of ~`batch`."""
        goal = self.made + responses
        while self.made < goal:
            out, n = [], 0
            while n < batch and self.made < goal:
                c = self.conversation()
                out.append(c)
                n += len(c.responses)
            yield out

    def long_line(self, items: int) -> tuple[ImportedConversation, list[str]]:
        """One conversation of `items` alternating messages in one line (no response rows): the
        cold-context probe; and its item ids, in order."""
        words = self.words
        chain = [witems.from_input(m.Message(role="user" if k % 2 == 0 else "assistant",
                                             content=words.user() if k % 2 == 0 else words.about(200)))
                 for k in range(items)]
        conv_id = new_id("conv")
        return ImportedConversation(conv_id=conv_id, tree=conv_id, metadata={"bench": "long"}, created_at=TIME0,
                                    items=chain, parents=[None, *range(items - 1)], item_created=[TIME0] * items,
                                    head=items - 1), [it.item_id for it in chain]
