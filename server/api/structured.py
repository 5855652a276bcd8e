"""Structured outputs: `response_format`, `tools` and vLLM's `guided_*` turned into grammars the engine enforces.

The grammar library is llguidance (Microsoft's, also a vLLM backend), chosen after measuring it
against xgrammar on SmolLM2's vocabulary (`python -m loadtests.compare_grammar_libs`; the README's
Dependencies table has the figures): both compile and mask far below a decode step, and llguidance
won on what a user pays for: it is one self-contained wheel with no dependencies, where xgrammar pulls in triton (hundreds
of MB on a CPU machine), and it names the schema feature it cannot enforce, which becomes our 400.

Schemas are tightened first (schemas.py: strict objects, capped strings and integers, bounded
size), so that a small model's constrained answer finishes. JSON is generated compactly with fixed
separators (", " and ": "), never with free whitespace: a small model that may write whitespace
forever inside a JSON value would run to max_tokens.

Tool calls use one documented format (the Hermes / Qwen convention) whatever the base:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, announced in a system message (or by
the chat template itself when it knows that format); tool_calls.py reads them back out. With
tool_choice `required` or a named function the whole answer is constrained to such calls; with
`auto` the answer is free text that cannot contain `<tool_call>`, optionally followed by calls
(a call the model starts is constrained from its opening tag on), or, with a `response_format`,
an answer in that format or calls. One call per answer unless `parallel_tool_calls: true` (then up
to MAX_PARALLEL_CALLS): OpenAI's default is parallel, but a small model allowed to call again
repeats its call until max_tokens. For the same reason, with `required` a function whose call was
just answered (the conversation ends with its result) is not offered again when another is: a
small model otherwise copies its previous call forever (pydantic-ai's output tool loop).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, NamedToolChoice, ResponseFormat, SamplingFields, Tool
from server.api.schemas import SchemaPolicy, SchemaTooLarge, prepare_schema
from server.api.tool_calls import CALL_CLOSE, CALL_OPEN
from server.engine.constraint import TokenConstraint

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_PARALLEL_CALLS = 4
# free text that never contains a call's opening tag (`&` and `~`: llguidance's regex and / not)
_FREE_TEXT = f"/(?s:.*)/ & ~/(?s:.*){CALL_OPEN}(?s:.*)/"


@dataclass(frozen=True)
class OutputFormat:
    """What one request's answer must look like: a grammar (None: free text), and whether it may hold tool calls."""

    grammar: str | None = None
    tools: bool = False


FREE_TEXT = OutputFormat()


def _json_ref_to_arguments(node: object) -> object:
    """Local references of a tool's parameter schema, once it sits under properties.arguments of the call
    schema: '#/$defs/...' stays (the definitions move to the call's root), other '#...' pointers move down."""
    if isinstance(node, dict):
        out = {key: _json_ref_to_arguments(value) for key, value in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and not ref.startswith(("#/$defs/", "#/definitions/")):
            out["$ref"] = "#/properties/arguments" + ref[1:]
        return out
    if isinstance(node, list):
        return [_json_ref_to_arguments(value) for value in node]
    return node


def tool_parameters(tool: Tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_prompt(tools: list[Tool]) -> str:
    """The system text that announces the tools, in the format the grammar enforces."""
    listed = "\n".join(json.dumps({"name": t.function.name, "description": t.function.description or "",
                                   "parameters": tool_parameters(t)})
                       for t in tools)
    return (f"You can call these functions. To call one, answer with only {CALL_OPEN}{{\"name\": <function name>, "
            f"\"arguments\": <arguments as a JSON object>}}{CALL_CLOSE} (one line per call). Functions:\n{listed}")


def _just_answered(req: ChatCompletionRequest) -> set[str]:
    """Functions the last assistant turn called, when the conversation ends with their results."""
    messages = req.messages
    end = len(messages)
    while end and messages[end - 1].role in ("tool", "function"):
        end -= 1
    if end == len(messages) or not end or messages[end - 1].role != "assistant":
        return set()
    return {call.name for call in messages[end - 1].calls()}


class OutputFormats:
    """Builds and checks grammars against the served tokenizer; makes one matcher per choice."""

    def __init__(self, tokenizer, vocab_size: int, end_token_ids: frozenset[int], policy: SchemaPolicy = SchemaPolicy()):
        # Masks are computed on the engine thread between forward passes; a multi-threaded rayon pool
        # there fights torch's OpenMP threads for the same cores, which made masks many times slower.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.policy = policy
        self.vocab_size = vocab_size
        # errors name the problem without the parser's internal state dump (which may echo the schema)
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(end_token_ids))
        self._warm(tokenizer)

    def _warm(self, tokenizer) -> None:
        """The library builds its token tables on first use (seconds on a small CPU for the first string,
        number and key states): walk a sample JSON answer once at start, so no request pays for it."""
        grammar = self._json_grammar({"type": "object"}, True, "response_format")
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
            schema, strict = {"type": "object"}, True
        else:
            schema, strict = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}, \
                fmt.json_schema.strict is not False
        return OutputFormat(self._checked(lambda s: self._json_grammar(s, strict, "response_format"), schema,
                                          "response_format"))

    def for_guided(self, req: SamplingFields) -> OutputFormat | None:
        """vLLM's guided_json / guided_regex / guided_choice / guided_grammar (or structured_outputs); None: none given."""
        guided = req.guided()
        if guided is None:
            return None
        kind, value, param = guided
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else value
            return OutputFormat(self._checked(lambda s: self._json_grammar(s, True, param), schema, param))
        if kind == "regex":
            return OutputFormat(self._checked(self._llg.LLMatcher.grammar_from_regex, value, param))
        if kind == "choice":
            lark = "start: " + " | ".join(json.dumps(choice) for choice in value)
            return OutputFormat(self._checked(self._llg.LLMatcher.grammar_from_lark, lark, param))
        # a grammar: Lark (llguidance's dialect) or GBNF / EBNF as vLLM's xgrammar backend takes
        return OutputFormat(self._checked(lambda text: self._llg.grammar_from("grammar", text), value, param))

    def for_chat(self, req: ChatCompletionRequest) -> OutputFormat:
        guided = self.for_guided(req)
        if guided is not None:
            return guided
        if not req.tools or req.tool_choice == "none":
            return self.for_response_format(req.response_format)
        choice = req.tool_choice
        tools = req.tools
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == choice.function.name]
        elif choice == "required":
            answered = _just_answered(req)
            if any(t.function.name not in answered for t in tools):
                tools = [t for t in tools if t.function.name not in answered]
        # one call unless the client asks for parallel calls: a small model asked to may call again and again
        more = f' ("\\n" {json.dumps(CALL_OPEN)} body){{0,{MAX_PARALLEL_CALLS - 1}}}' if req.parallel_tool_calls else ""
        alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules = [f"body: ({alternatives}) {json.dumps(CALL_CLOSE)}"]
        rules += [f"call_{i}: %json {json.dumps(self._call_schema(t))}" for i, t in enumerate(tools)]
        calls = f"{json.dumps(CALL_OPEN)} body{more}"
        if choice in (None, "auto"):
            fmt = req.response_format
            if fmt is not None and fmt.type != "text":  # an answer in the format, or calls
                start = f"start: answer | calls\ncalls: {calls}\n" + self._format_rule(fmt)
            else:  # text (never holding a call's opening tag), then optionally calls
                start = (f"start: TEXT | opening body{more}\nTEXT: {_FREE_TEXT}\n"
                         f"opening[lazy]: /(?s:.*){CALL_OPEN}/")
        else:  # "required" or a named function: nothing but calls
            start = "start: " + calls
        lark = "\n".join([start, *rules])
        return OutputFormat(self._checked(self._llg.LLMatcher.grammar_from_lark, lark, "tools"), tools=True)

    def constraints(self, fmt: OutputFormat, choices: int) -> list[TokenConstraint]:
        """A fresh, warmed matcher per choice (its state is that choice's text) for a format with a
        grammar; call it off the event loop."""
        return [TokenConstraint(self._llg.LLMatcher(self._tokenizer, fmt.grammar, limits=self._limits),
                                self.vocab_size, fmt.grammar).warm()
                for _ in range(choices)]

    # ---- schemas -------------------------------------------------------------------------

    def _prepared(self, schema: object, strict: bool, param: str) -> dict:
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, f"{param}: a JSON schema is an object, got {type(schema).__name__}", param=param)
        try:
            prepared = prepare_schema(schema, strict, self.policy, param)
        except SchemaTooLarge as exc:
            raise APIError(400, str(exc), param=param) from None
        return {**prepared, "x-guidance": JSON_STYLE}

    def _json_grammar(self, schema: object, strict: bool, param: str) -> str:
        return self._llg.LLMatcher.grammar_from_json_schema(json.dumps(self._prepared(schema, strict, param)),
                                                            overrides=JSON_STYLE)

    def _format_rule(self, fmt: ResponseFormat) -> str:
        if fmt.type == "json_object":
            schema, strict = {"type": "object"}, True
        else:
            spec = fmt.json_schema
            schema, strict = (spec.schema_ if spec.schema_ is not None else {}), spec.strict is not False
        return f"answer: %json {json.dumps(self._prepared(schema, strict, 'response_format'))}"

    def _call_schema(self, tool: Tool) -> dict:
        parameters = tool_parameters(tool)
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise APIError(400, f"tools: the parameters of {tool.function.name!r} must be a JSON schema of type "
                                "object (the arguments are a JSON object)", param="tools")
        parameters = {key: value for key, value in parameters.items() if key != "x-guidance"}
        prepared = self._prepared(parameters, tool.function.strict is not False, "tools")
        prepared.pop("x-guidance")
        hoisted = {key: prepared.pop(key) for key in ("$defs", "definitions") if key in prepared}
        return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                                 "arguments": _json_ref_to_arguments(prepared)},
                "required": ["name", "arguments"], "additionalProperties": False, **hoisted, "x-guidance": JSON_STYLE}

    def _checked(self, build, source, param: str) -> str:
        """The grammar, or a 400 naming what cannot be enforced: never a silently unconstrained answer."""
        try:
            grammar = build(source)
            problem = self._llg.LLMatcher.validate_grammar(grammar, self._tokenizer, limits=self._limits)
        except APIError:
            raise
        except Exception as exc:  # the library refused the input itself
            problem = str(exc) or type(exc).__name__
        if problem:
            what = {"response_format": "the JSON schema", "tools": "the tools' parameter schemas"}.get(
                param, f"the {param} constraint")
            problem = " ".join(problem.replace("<non-verbose/>", "").split())
            raise APIError(400, f"{what} cannot be enforced: {problem[:300]}", param=param)
        return grammar
