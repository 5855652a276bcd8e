"""OpenAI's cursor-paged list body, shared by the endpoints that list stored objects (batches, a response's
input items): the same clamp of `limit` and the same first_id / last_id / has_more for every client's pager."""
from __future__ import annotations


def list_page(items: list[dict], limit: int) -> dict:
    """The first `limit` (clamped to 1..100) of `items`, already ordered and cut after the client's cursor."""
    limit = max(1, min(limit, 100))
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
