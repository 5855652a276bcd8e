"""What constrained output allows, pinned on the grammar library itself (llguidance, the served tokenizer):
strict objects, capped strings, the size limits, and tool calls read back out of an answer. No server:
every check walks a real matcher over real tokens."""
import json

import jsonschema
import pytest

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat
from server.api.schemas import MAX_OPEN_KEYS, SchemaPolicy, prepare_schema
from server.api.structured import OutputFormats
from server.api.tool_calls import CallReader, read_answer

CAP = 16


@pytest.fixture(scope="module")
def formats(tokenizer):
    return OutputFormats(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), SchemaPolicy(CAP))


def allows(formats, tokenizer, output, text: str) -> bool:
    """Whether the format lets the model write exactly `text` and stop there."""
    constraint = formats.constraints(output, 1)[0]
    try:
        for token in tokenizer.encode(text, add_special_tokens=False):
            constraint.accept(token)
    except ValueError:
        return False
    return constraint._matcher.is_accepting()


def schema_format(schema, strict=None) -> ResponseFormat:
    spec = {"name": "s", "schema": schema, **({} if strict is None else {"strict": strict})}
    return ResponseFormat.model_validate({"type": "json_schema", "json_schema": spec})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


OPEN = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}  # no additionalProperties
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}


def test_an_undeclared_key_is_impossible_unless_the_schema_allows_it(formats, tokenizer):
    strict = formats.for_response_format(schema_format(OPEN))
    assert allows(formats, tokenizer, strict, '{"city": "Oslo"}')
    assert not allows(formats, tokenizer, strict, '{"city": "Oslo", "type": "action"}')
    allowed = formats.for_response_format(schema_format({**OPEN, "additionalProperties": True}))
    assert allows(formats, tokenizer, allowed, '{"city": "Oslo", "type": "action"}')
    typed = formats.for_response_format(schema_format({**OPEN, "additionalProperties": {"type": "integer"}}))
    assert allows(formats, tokenizer, typed, '{"city": "Oslo", "n": 3}')
    assert not allows(formats, tokenizer, typed, '{"city": "Oslo", "n": "x"}')
    opted_out = formats.for_response_format(schema_format(OPEN, strict=False))
    assert allows(formats, tokenizer, opted_out, '{"city": "Oslo", "type": "action"}')


def test_nested_objects_items_and_definitions_are_strict_too(formats, tokenizer):
    schema = {"$defs": {"step": {"type": "object", "properties": {"n": {"type": "integer"}, "text": {"type": "string"}},
                                 "required": ["n", "text"]}},
              "type": "object", "properties": {"title": {"type": "string"},
                                               "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}}},
              "required": ["title", "steps"]}
    output = formats.for_response_format(schema_format(schema))
    assert allows(formats, tokenizer, output, '{"title": "Tea", "steps": [{"n": 1, "text": "Boil"}]}')
    assert not allows(formats, tokenizer, output, '{"title": "Tea", "steps": [{"n": 1, "text": "Boil", "type": "a"}]}')
    tuple_schema = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}
    output = formats.for_response_format(schema_format(tuple_schema))
    assert allows(formats, tokenizer, output, '[1, "a"]') and not allows(formats, tokenizer, output, '[1, "a", 2]')


def test_free_form_objects_stay_open_and_parts_merged_by_allof_are_not_closed(formats, tokenizer):
    any_object = formats.for_response_format(ResponseFormat(type="json_object"))
    assert allows(formats, tokenizer, any_object, '{"dogs": ["rex"], "count": 2}')
    merged = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert allows(formats, tokenizer, formats.for_response_format(schema_format(merged)), '{"a": 1, "b": 2}')


def test_strings_are_capped_and_a_schema_maxlength_raises_or_lowers_the_cap(formats, tokenizer):
    capped = formats.for_response_format(schema_format({"type": "string"}))
    assert allows(formats, tokenizer, capped, json.dumps("x" * CAP))
    assert not allows(formats, tokenizer, capped, json.dumps("x" * (CAP + 1)))
    raised = formats.for_response_format(schema_format({"type": "string", "maxLength": 3 * CAP}))
    assert allows(formats, tokenizer, raised, json.dumps("x" * 3 * CAP))
    lowered = formats.for_response_format(schema_format({"type": "string", "maxLength": 2}))
    assert not allows(formats, tokenizer, lowered, '"xyz"')
    # values of any type: json_object's, a free-form object's, an explicit additionalProperties: true
    any_object = formats.for_response_format(ResponseFormat(type="json_object"))
    assert not allows(formats, tokenizer, any_object, json.dumps({"a": ["x" * (CAP + 1)]}))
    assert allows(formats, tokenizer, any_object, json.dumps({"a": ["x" * CAP]}))
    uncapped = OutputFormats.__new__(OutputFormats)
    uncapped.__dict__.update(formats.__dict__, policy=SchemaPolicy(0))  # max_string_length 0: no cap
    assert allows(formats, tokenizer, uncapped.for_response_format(schema_format({"type": "string"})),
                  json.dumps("x" * 5 * CAP))


def test_numbers_without_bounds_get_at_most_15_digits_and_a_bound_in_the_schema_wins(formats, tokenizer):
    for kind in ("integer", "number"):
        output = formats.for_response_format(schema_format({"type": kind}))
        assert allows(formats, tokenizer, output, "9" * 15) and allows(formats, tokenizer, output, "-" + "9" * 15)
        assert not allows(formats, tokenizer, output, "1" + "0" * 15)
    bounded = formats.for_response_format(schema_format({"type": "integer", "maximum": 10**17}))
    assert allows(formats, tokenizer, bounded, "1" + "0" * 17)
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_OPEN_KEYS)}}
    formats.for_response_format(schema_format(many))  # bounded integers stay cheap to compile


def test_numbers_get_at_most_8_decimals_unless_the_schema_says_its_own_multipleof(formats, tokenizer):
    output = formats.for_response_format(schema_format({"type": "object", "properties": {"x": {"type": "number"}}}))
    assert allows(formats, tokenizer, output, '{"x": 3.14159265}') and allows(formats, tokenizer, output, '{"x": -0.5}')
    assert not allows(formats, tokenizer, output, '{"x": 3.141592653}')
    assert not allows(formats, tokenizer, output, '{"x": 1.' + "1" * 40 + "}")
    halves = formats.for_response_format(schema_format({"type": "number", "multipleOf": 0.5}))
    assert allows(formats, tokenizer, halves, "2.5") and not allows(formats, tokenizer, halves, "2.25")
    free = OutputFormats(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}), SchemaPolicy(CAP, 0))
    assert allows(free, tokenizer, free.for_response_format(schema_format({"type": "number"})), "1." + "1" * 20)


def test_tool_arguments_follow_the_same_rules_and_strict_false_opens_them(formats, tokenizer):
    required = formats.for_chat(chat(tools=[WEATHER], tool_choice="required"))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>'
    assert allows(formats, tokenizer, required, call)
    padded = call.replace('"unit": "c"', '"unit": "c", "description": "Weather"')
    assert not allows(formats, tokenizer, required, padded)
    assert not allows(formats, tokenizer, required, "Oslo is cold.")
    loose = {**WEATHER, "function": {**WEATHER["function"], "strict": False}}
    assert allows(formats, tokenizer, formats.for_chat(chat(tools=[loose], tool_choice="required")), padded)


def test_tool_parameters_with_definitions_keep_their_references(formats, tokenizer):
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]}}}
    output = formats.for_chat(chat(tools=[tool], tool_choice="required"))
    assert allows(formats, tokenizer, output, '<tool_call>{"name": "add", "arguments": {"p": {"x": 3}}}</tool_call>')


def test_auto_allows_text_then_a_call_but_never_a_call_tag_inside_text(formats, tokenizer):
    auto = formats.for_chat(chat(tools=[WEATHER], tool_choice="auto"))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert allows(formats, tokenizer, auto, "It is a < b, in <b>bold</b>.")
    assert allows(formats, tokenizer, auto, call)
    assert allows(formats, tokenizer, auto, "Let me look. " + call)
    assert not allows(formats, tokenizer, auto, call + " Done.")  # after a call: nothing
    assert not allows(formats, tokenizer, auto, '<tool_call>{"name": "get_weather", "arguments": {"town": "Oslo"}}')


def test_response_format_with_tools_answers_in_the_format_or_calls(formats, tokenizer):
    output = formats.for_chat(chat(tools=[WEATHER], tool_choice="auto", response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": OPEN}}))
    assert allows(formats, tokenizer, output, '{"city": "Oslo"}')
    assert allows(formats, tokenizer, output, '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                              '</tool_call>')
    assert not allows(formats, tokenizer, output, "Oslo")


def test_required_does_not_offer_again_the_function_whose_result_just_came_back(formats, tokenizer):
    final = {"type": "function", "function": {"name": "final_result", "parameters": OPEN}}
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}]
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": history, "tools": [WEATHER, final],
                                                    "tool_choice": "required"})
    output = formats.for_chat(request)
    again = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert not allows(formats, tokenizer, output, again)
    assert allows(formats, tokenizer, output, '<tool_call>{"name": "final_result", "arguments": {"city": "Paris"}}'
                                              '</tool_call>')
    # the only function: still offered (required must be able to call something); auto: unchanged
    alone = request.model_copy(update={"tools": request.tools[:1]})
    assert allows(formats, tokenizer, formats.for_chat(alone), again)
    auto = request.model_copy(update={"tool_choice": "auto"})
    assert allows(formats, tokenizer, formats.for_chat(auto), again)


def test_vllm_guided_constraints_compile(formats, tokenizer):
    def guided(**fields):
        return formats.for_guided(CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields}))

    assert allows(formats, tokenizer, guided(guided_choice=["yes", "no"]), "no")
    assert not allows(formats, tokenizer, guided(guided_choice=["yes", "no"]), "maybe")
    assert allows(formats, tokenizer, guided(guided_regex="[0-9]{3}"), "123")
    assert not allows(formats, tokenizer, guided(guided_regex="[0-9]{3}"), "12a")
    assert allows(formats, tokenizer, guided(guided_grammar='root ::= "a" "b"+'), "abb")  # GBNF
    assert allows(formats, tokenizer, guided(guided_grammar='start: "x" /[0-9]+/'), "x12")  # Lark
    assert not allows(formats, tokenizer, guided(guided_json=OPEN), '{"city": "Oslo", "x": 1}')
    assert allows(formats, tokenizer, guided(structured_outputs={"json": json.dumps(OPEN)}), '{"city": "Oslo"}')
    assert guided() is None


def test_a_schema_with_too_many_optional_keys_is_refused_naming_the_limit(formats, tokenizer):
    """500 optional integer properties compiled, then failed on the first key with the parser's state dump
    (a 500): refused up front now, naming the limit; at the limit, generation goes through."""
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(500)}}
    with pytest.raises(APIError) as err:
        formats.for_response_format(schema_format(many))
    assert err.value.status == 400 and err.value.param == "response_format"
    assert f"at most {MAX_OPEN_KEYS}" in err.value.message and "<state>" not in err.value.message
    tool = {"type": "function", "function": {"name": "f", "parameters": many}}
    with pytest.raises(APIError) as err:
        formats.for_chat(chat(tools=[tool], tool_choice="required"))
    assert err.value.param == "tools"
    alternatives = {"anyOf": [{"type": "object", "properties": {f"k{i}_{j}": {"type": "integer"} for j in range(5)}}
                              for i in range(100)]}
    with pytest.raises(APIError, match="500 different keys"):
        formats.for_response_format(schema_format(alternatives))
    at_limit = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_OPEN_KEYS)}}
    assert allows(formats, tokenizer, formats.for_response_format(schema_format(at_limit)), '{"p7": 1, "p9": 2}')


def test_prepare_schema_never_changes_the_callers_schema():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    before = json.dumps(schema)
    prepared = prepare_schema(schema, True, SchemaPolicy(8), "response_format")
    assert json.dumps(schema) == before
    assert prepared["additionalProperties"] is False and prepared["properties"]["a"]["maxLength"] == 8
    jsonschema.Draft202012Validator.check_schema(prepared)


def test_the_call_reader_streams_id_and_name_first_then_arguments_and_never_leaks_markup():
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "a}</tool_call>b", '
            '"n": [1, {"x": 2}]}}</tool_call>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    reader, events = CallReader(), []
    for char in text:  # the worst split: one character at a time
        events += reader.feed(char)
    events += reader.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    assert content == "Let me check. " and "<" not in content
    kinds = [e[0] for e in events if e[0] != "content"]
    assert kinds[0] == "call" and kinds[1] == "arguments" and kinds.count("call") == 2
    arguments = "".join(e[2] for e in events if e[0] == "arguments" and e[1] == 0)
    assert json.loads(arguments) == {"city": "a}</tool_call>b", "n": [1, {"x": 2}]}
    assert [c.complete for c in reader.calls] == [True, True] and reader.calls[1].arguments == "{}"
    content, calls = read_answer('<tool_call>{"name": "get_weather", "arguments": {"city": "Os')
    assert content == "" and calls[0].arguments == '{"city": "Os' and not calls[0].complete
    assert read_answer("a < b <tool_")[0] == "a < b <tool_"  # text that only looked like a call's start
