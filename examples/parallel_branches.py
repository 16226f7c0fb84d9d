"""The forum's use case, the branchwise way: two different follow-ups at once on ONE
conversation, no copying, no lock. Run against a branchwise server:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=anything python examples/parallel_branches.py
"""

from __future__ import annotations

import asyncio

from openai import AsyncOpenAI

MODEL = "gpt-4.1-mini"


async def main() -> None:
    client = AsyncOpenAI()

    conv = await client.conversations.create(
        metadata={"topic": "branching-demo"},
        items=[{"role": "user", "content": "We are planning a weekend trip to Paris. "
                                           "We like museums, good food, and walking around the city."}],
    )
    first = await client.responses.create(model=MODEL, conversation=conv.id,
                                          input="Give me a quick 3-bullet itinerary.", max_output_tokens=256)
    print(f"Conversation {conv.id}\n\nFirst answer:\n{first.output_text}\n")

    # Two follow-ups at the same time on the same conversation. OpenAI answers the second with
    # 400 conversation_locked; branchwise runs both, each from the head it saw.
    a, b = await asyncio.gather(
        client.responses.create(model=MODEL, conversation=conv.id, max_output_tokens=256,
                                input="Continue, but respond like a very formal travel agent."),
        client.responses.create(model=MODEL, conversation=conv.id, max_output_tokens=256,
                                input="Continue, but respond like a funny travel buddy."),
    )
    print(f"Branch A (formal agent):\n{a.output_text}\n\nBranch B (funny buddy):\n{b.output_text}\n")

    # Both answers are kept: the first to finish became the conversation's head, the other is a
    # sibling branch. The tree shows both; /head picks either one. The SDK reaches the extension
    # routes with its generic get/post.
    tree = await client.get(f"/conversations/{conv.id}/tree", cast_to=object)
    print(f"The tree holds {len(tree['data'])} items; head = {tree['head']}")
    await client.post(f"/conversations/{conv.id}/head", body={"item_id": b.output[-1].id}, cast_to=object)
    items = [it async for it in client.conversations.items.list(conv.id, order="asc")]
    print(f"After choosing branch B the conversation reads {len(items)} items, ending with:\n"
          f"{items[-1].content[0].text}")


if __name__ == "__main__":
    asyncio.run(main())
