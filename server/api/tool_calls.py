"""Tool calls read out of an answer as it is generated: text, then each call's id and name, then its arguments.

The grammar (structured.py) makes an answer with tools look like
    [free text (tool_choice auto only)] <tool_call>{"name": "NAME", "arguments": ARGS}</tool_call> ["\\n" <tool_call>...]
with ARGS compact JSON. `CallReader` is fed the answer's text piece by piece and says what a client
may be told so far: plain text (held back while it could be the start of `<tool_call>`), a call's id
and name as soon as its name is complete, and the argument text as it is generated (OpenAI's stream
shape); the argument object's end is found by counting brackets outside strings, so a `}` or a
`</tool_call>` inside a string value never ends it. The same reader shapes a whole answer, so a
streamed and an unstreamed answer always agree, and raw call markup never reaches `content`.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\{"name": "([^"\\]*)", "arguments": ')
_TAIL = "}" + CALL_CLOSE


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False  # the arguments object and the call's closing tag were generated

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class Events(list):
    """What one piece of text added, in order: ("content", text), ("call", index, ToolCall) when a call's
    name is complete, ("arguments", index, text) as its arguments are generated."""

    def add(self, kind: str, *item) -> None:
        if kind != "call" and self and self[-1][0] == kind and self[-1][1:-1] == item[:-1]:
            self[-1] = (*self[-1][:-1], self[-1][-1] + item[-1])  # one piece of text: one event
        else:
            self.append((kind, *item))


class CallReader:
    def __init__(self):
        self.calls: list[ToolCall] = []
        self.content = ""  # all content given out so far
        self._state = "text"  # text | header | arguments | tail | between
        self._buffer = ""  # text not yet accounted for in the current state
        self._depth = 0
        self._in_string = self._escaped = False

    def feed(self, text: str) -> Events:
        events = Events()
        self._buffer += text
        while self._buffer:
            if not self._step(events):
                break
        self.content += "".join(item[1] for item in events if item[0] == "content")
        return events

    def finish(self) -> Events:
        """The answer ended: text still held (a `<` that did not open a call) is content after all."""
        events = Events()
        if self._state == "text" and self._buffer:
            events.add("content", self._buffer)
            self.content += self._buffer
            self._buffer = ""
        return events

    # ---- one state at a time; False: wait for more text -----------------------------------

    def _step(self, events: Events) -> bool:
        state, buffer = self._state, self._buffer
        if state == "text":
            at = buffer.find(CALL_OPEN)
            if at >= 0:
                if at:
                    events.add("content", buffer[:at])
                self._buffer, self._state = buffer[at + len(CALL_OPEN):], "header"
                return True
            keep = _partial_suffix(buffer, CALL_OPEN)  # might be the start of a call: hold it
            if len(buffer) > keep:
                events.add("content", buffer[: len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep:]
            return False
        if state == "header":
            match = _HEADER.match(buffer)
            if match is None:
                return False
            call = ToolCall(f"call_{secrets.token_hex(12)}", match.group(1))
            self.calls.append(call)
            events.add("call", len(self.calls) - 1, call)
            self._buffer, self._state = buffer[match.end():], "arguments"
            self._depth, self._in_string, self._escaped = 0, False, False
            return True
        if state == "arguments":
            end = self._scan(buffer)
            piece = buffer if end is None else buffer[:end]
            call = self.calls[-1]
            call.arguments += piece
            if piece:
                events.add("arguments", len(self.calls) - 1, piece)
            if end is None:
                self._buffer = ""
                return False
            self._buffer, self._state = buffer[end:], "tail"
            return True
        if state == "tail":
            if not buffer.startswith(_TAIL[: len(buffer)]):
                self._buffer = ""  # not our format (the grammar forbids it): drop it rather than leak markup
                return False
            if len(buffer) < len(_TAIL):
                return False
            self.calls[-1].complete = True
            self._buffer, self._state = buffer[len(_TAIL):], "between"
            return True
        # between calls: "\n" then the next call's opening tag
        stripped = buffer.lstrip()
        if stripped.startswith(CALL_OPEN):
            self._buffer, self._state = stripped[len(CALL_OPEN):], "header"
            return True
        if CALL_OPEN.startswith(stripped):
            return False
        self._buffer = ""
        return False

    def _scan(self, text: str) -> int | None:
        """Where the argument object ends in `text` (the index after its closing bracket), or None."""
        for index, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                continue
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return index + 1
        return None


def _partial_suffix(text: str, token: str) -> int:
    """The length of the longest end of `text` that is a beginning of `token`."""
    for size in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-size:]):
            return size
    return 0


def read_answer(text: str) -> tuple[str, list[ToolCall]]:
    """A whole answer: (its content, its calls)."""
    reader = CallReader()
    reader.feed(text)
    reader.finish()
    return reader.content, reader.calls
