"""Server-Sent Events framing for streamed completions (OpenAI's `data: {...}` lines, then `[DONE]`)."""
from __future__ import annotations

import json

from server.api.errors import APIError


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def sse_error(error: APIError) -> bytes:
    """An error after the 200 has gone out: OpenAI's error object as the stream's last event."""
    return sse({"error": {"message": error.message, "type": "server_error", "param": None, "code": error.code}})
