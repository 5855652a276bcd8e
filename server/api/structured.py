"""Structured outputs: `response_format` and `tools` turned into grammars the engine enforces.

The grammar library is llguidance (Microsoft's, also a vLLM backend). Measured on SmolLM2's
49,152-token vocabulary against xgrammar 0.2.9 (`python -m loadtests.compare_grammar_libs`):
a JSON schema compiles in ~1.5 ms (xgrammar ~6.7 ms) and the next-token mask takes ~11 us at the
median (xgrammar ~2 us); both are far below a decode step. llguidance won on what a user pays
for: it is one self-contained wheel with no dependencies, where xgrammar pulls in triton (hundreds
of MB on a CPU machine), and it names the schema feature it cannot enforce, which becomes our 400.

JSON is generated compactly with fixed separators (", " and ": "), never with free whitespace: a
small model that may write whitespace forever inside a JSON value would run to max_tokens.

Tool calls use one documented format (the Hermes / Qwen convention) whatever the base:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, announced in a system message (or by
the chat template itself when it knows that format). With tool_choice `required` or a named
function the whole answer is constrained to such calls; with `auto` the answer is free text that
may not start with "<", or calls: a call the model starts is constrained once it starts. One call
per answer unless `parallel_tool_calls: true` (then up to MAX_PARALLEL_CALLS): OpenAI's default is
parallel, but a small model allowed to call again repeats its call until max_tokens.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass

import torch

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, NamedToolChoice, ResponseFormat, Tool
from server.engine.constraint import TokenConstraint

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 4
_CALLS = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class OutputFormat:
    """What one request's answer must look like: a grammar (None: free text), and whether it may hold tool calls."""

    grammar: str | None = None
    tools: bool = False


FREE_TEXT = OutputFormat()


def _styled(schema: dict) -> dict:
    return {**schema, "x-guidance": JSON_STYLE}


def _call_schema(tool: Tool) -> dict:
    parameters = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_prompt(tools: list[Tool]) -> str:
    """The system text that announces the tools, in the format the grammar enforces."""
    listed = "\n".join(json.dumps({"name": t.function.name, "description": t.function.description or "",
                                   "parameters": t.function.parameters or {"type": "object", "properties": {}}})
                       for t in tools)
    return (f"You can call these functions. To call one, answer with only {CALL_OPEN}{{\"name\": <function name>, "
            f"\"arguments\": <arguments as a JSON object>}}{CALL_CLOSE} (one line per call). Functions:\n{listed}")


def parse_tool_calls(text: str) -> list[dict] | None:
    """OpenAI tool_calls from an answer that is made of calls; None when it is plain text (or a cut call)."""
    if not text.lstrip().startswith(CALL_OPEN):
        return None
    calls = []
    for body in _CALLS.findall(text):
        try:
            call = json.loads(body)
            name, arguments = call["name"], call["arguments"]
        except (ValueError, KeyError, TypeError):
            return None
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments)}})
    return calls or None


class OutputFormats:
    """Builds and checks grammars against the served tokenizer; makes one matcher per choice."""

    def __init__(self, tokenizer, vocab_size: int, end_token_ids: frozenset[int]):
        # Masks are computed on the engine thread between forward passes; a multi-threaded rayon pool
        # there fights torch's OpenMP threads, and on a 2-core machine made a mask ~10x slower.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(end_token_ids))
        self._warm(tokenizer)

    def _warm(self, tokenizer) -> None:
        """The library builds its token tables on first use (~2 s here for the first string, number
        and key states): walk a sample JSON answer once at start, so no request pays for it."""
        grammar = self._llg.LLMatcher.grammar_from_json_schema(json.dumps(_styled({"type": "object"})))
        constraint = self.constraints(OutputFormat(grammar), 1)[0]
        logits = torch.zeros(self.vocab_size)
        sample = '{"name": "Ann Lee", "age": 31, "score": -2.5e3, "ok": true, "tags": ["a", "b"], "x": null}'
        for token in tokenizer.encode(sample, add_special_tokens=False):
            constraint(logits.clone())
            constraint.accept(token)

    # ---- what a request asks for ----------------------------------------------------------

    def for_response_format(self, fmt: ResponseFormat | None) -> OutputFormat:
        if fmt is None or fmt.type == "text":
            return FREE_TEXT
        if fmt.type == "json_object":
            schema = {"type": "object"}
        else:
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
        return OutputFormat(self._checked(self._llg.LLMatcher.grammar_from_json_schema, _styled(schema),
                                          "response_format"))

    def for_chat(self, req: ChatCompletionRequest) -> OutputFormat:
        if not req.tools or req.tool_choice == "none":
            return self.for_response_format(req.response_format)
        choice = req.tool_choice
        tools = req.tools
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == choice.function.name]
        # one call unless the client asks for parallel calls: a small model asked to may call again and again
        calls = f'call ("\\n" call)~0..{MAX_PARALLEL_CALLS - 1}' if req.parallel_tool_calls else "call"
        alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules = [f"call: {json.dumps(CALL_OPEN)} ({alternatives}) {json.dumps(CALL_CLOSE)}"]
        rules += [f"call_{i}: %json {json.dumps(_styled(_call_schema(t)))}" for i, t in enumerate(tools)]
        if choice in (None, "auto"):
            start = "start: free | calls\nfree: /[^<][^\\x00]*/\ncalls: " + calls
        else:  # "required" or a named function: nothing but calls
            start = "start: " + calls
        lark = "\n".join([start, *rules])
        return OutputFormat(self._checked(self._llg.LLMatcher.grammar_from_lark, lark, "tools"), tools=True)

    def constraints(self, fmt: OutputFormat, choices: int) -> list[TokenConstraint]:
        """A fresh, warmed matcher per choice (its state is that choice's text) for a format with a
        grammar; call it off the event loop."""
        return [TokenConstraint(self._llg.LLMatcher(self._tokenizer, fmt.grammar), self.vocab_size, fmt.grammar).warm()
                for _ in range(choices)]

    def _checked(self, build, source, param: str) -> str:
        """The grammar, or a 400 naming what cannot be enforced: never a silently unconstrained answer."""
        try:
            grammar = build(json.dumps(source) if isinstance(source, dict) else source)
            problem = self._llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        except Exception as exc:  # the library refused the input itself
            problem = str(exc) or type(exc).__name__
        if problem:
            what = "the JSON schema" if param == "response_format" else "the tools' parameter schemas"
            raise APIError(400, f"{what} cannot be enforced: {problem.strip()[:500]}", param=param)
        return grammar
