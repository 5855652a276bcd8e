"""The Responses API and /tokenize, /detokenize against the real server (the suite's shared one), with the
official openai client, plain HTTP and the OpenAI Agents SDK (openai-agents) unmodified: an agent with a
function tool run to completion over its default Responses transport and over chat completions."""
import asyncio
import json

import httpx
import jsonschema
import pytest

from tests.support import BASE, assert_openai_error

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
CITY = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
        "required": ["name", "country"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def responses(server, body, **kwargs):
    return httpx.post(server.base_url + "/v1/responses", json=body, timeout=120, **kwargs)


def test_a_response_is_the_chat_answer_in_responses_shape_and_is_stored(server, client):
    chat = client.chat.completions.create(model=BASE, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}])
    reply = client.responses.with_raw_response.create(model=BASE, instructions="Answer briefly.", input=QUESTION,
                                                      max_output_tokens=12, temperature=0)
    response = reply.parse()
    assert reply.headers["x-expert"] == BASE and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content  # the same prompt, the same greedy answer
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.input_tokens_details.cached_tokens > 0  # the chat request's prompt was cached
    stored = client.responses.retrieve(response.id)
    assert stored.output_text == response.output_text and stored.usage == response.usage
    items = client.responses.input_items.list(response.id)
    assert [item.content[0].text for item in items.data] == [QUESTION]
    assert client.responses.delete(response.id) is None
    with pytest.raises(Exception) as gone:
        client.responses.retrieve(response.id)
    assert getattr(gone.value, "status_code", None) == 404
    unstored = client.responses.create(model=BASE, input=QUESTION, max_output_tokens=2, store=False)
    assert_openai_error(httpx.get(f"{server.base_url}/v1/responses/{unstored.id}"), 404, param="response_id")


def test_a_streamed_response_sends_the_semantic_events_and_agrees_with_the_whole_one(client):
    whole = client.responses.create(model="alpha", input=QUESTION, max_output_tokens=16, temperature=0)
    events = list(client.responses.create(model="alpha", input=QUESTION, max_output_tokens=16, temperature=0,
                                          stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == whole.output_text and final.model == "alpha"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == deltas  # a streamed response is stored too


def test_text_format_json_schema_and_json_object_are_enforced(client):
    fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
    response = client.responses.create(model=BASE, input="Name a city in Italy as JSON.", text={"format": fmt},
                                       max_output_tokens=60, temperature=0)
    jsonschema.validate(json.loads(response.output_text), CITY)
    response = client.responses.create(model="beta", input="Describe pancakes as a JSON object.",
                                       text={"format": {"type": "json_object"}}, max_output_tokens=60, temperature=0)
    assert isinstance(json.loads(response.output_text), dict)


def test_function_calls_and_their_outputs_round_trip_with_and_without_previous_response_id(server, client):
    first = client.responses.create(model=BASE, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", max_output_tokens=60, temperature=0)
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert "city" in json.loads(call.arguments) and first.status == "completed"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}
    # by reference: the stored conversation continues
    second = client.responses.create(model=BASE, previous_response_id=first.id, input=[result],
                                     max_output_tokens=30, temperature=0)
    # by value: the client sends the whole history, as the Agents SDK does
    history = [{"role": "user", "content": "What is the weather in Paris?"}, call.model_dump(exclude_none=True), result]
    again = client.responses.create(model=BASE, input=history, max_output_tokens=30, temperature=0)
    assert second.output_text and second.output_text == again.output_text
    assert second.usage.input_tokens == again.usage.input_tokens
    # streamed calls: the name first, then the arguments as generated
    events = list(client.responses.create(model=BASE, input="Weather in Rome?", tools=[WEATHER], stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=60, temperature=0))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert added[0].type == "function_call" and added[0].name == "get_weather" and added[0].arguments == ""
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert arguments == done.arguments == events[-1].response.output[0].arguments
    assert "city" in json.loads(arguments)


def test_experts_mixtures_and_auto_are_served_by_name(server):
    for model, expert in (("beta", "beta"), ("alpha+beta", "alpha:1.00,beta:1.00")):
        reply = responses(server, {"model": model, "input": QUESTION, "max_output_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-expert"] == expert and reply.json()["model"] == model
    routed = responses(server, {"model": "auto", "input": "Give me a recipe for pancakes.", "max_output_tokens": 4})
    # the router's decision when it has loaded (beta has this very prompt among its examples), else its fallback
    assert routed.status_code == 200 and routed.headers["x-router-source"] in ("classifier", "fallback")
    if routed.headers["x-router-source"] == "classifier":
        assert routed.headers["x-expert"] == routed.json()["model"] == "beta"  # the model that answered, as chat says


@pytest.mark.parametrize("body,param,words", [
    ({"tools": [{"type": "web_search"}]}, "tools", "web_search"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning"),
    ({"background": True}, "background", "background"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0].type", "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "input_image"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id", "not found"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, None, "nope"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
])
def test_what_is_not_served_is_a_400_naming_it(server, body, param, words):
    error = assert_openai_error(responses(server, {"model": BASE, "input": "hi", **body}), 400)
    assert param is None or error["param"] == param, error
    assert words in error["message"], error


def test_tokenize_and_detokenize_in_vllms_shapes(server, client):
    messages = [{"role": "user", "content": QUESTION}]
    counted = httpx.post(server.base_url + "/tokenize", json={"model": "alpha", "messages": messages}).json()
    chat = client.chat.completions.create(model=BASE, messages=messages, max_tokens=1)
    assert counted["count"] == len(counted["tokens"]) == chat.usage.prompt_tokens
    assert counted["max_model_len"] == 512 and counted["token_strs"] is None
    raw = httpx.post(server.base_url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert raw["count"] == 2 and raw["token_strs"] == ["Hello", "Ġworld"]
    text = httpx.post(server.base_url + "/detokenize", json={"model": BASE, "tokens": counted["tokens"]}).json()
    assert text["prompt"].endswith("assistant\n") and QUESTION in text["prompt"]
    assert_openai_error(httpx.post(server.base_url + "/detokenize", json={"tokens": [10 ** 7]}), 400, param="tokens")
    assert_openai_error(httpx.post(server.base_url + "/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    assert_openai_error(httpx.post(server.base_url + "/tokenize", json={"model": BASE}), 400)


def test_embeddings_and_moderations_say_they_are_not_served(server):
    for path in ("/v1/embeddings", "/v1/moderations"):
        error = assert_openai_error(httpx.post(server.base_url + path, json={}), 404)
        assert "does not serve" in error["message"] and "/v1/responses" in error["message"]


# ---- the OpenAI Agents SDK, unmodified ----------------------------------------------------------

@pytest.mark.parametrize("transport", ["responses", "chat_completions"])
def test_an_openai_agents_sdk_agent_calls_its_tool_and_answers(server, transport):
    """An agent with one function tool: the first turn must call it (ModelSettings tool_choice required;
    the SDK resets tool_choice after the call, its default), the second answers from its result."""
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no traces sent to OpenAI's servers
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 C in {city}."

    async def run():
        client = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model_class = OpenAIResponsesModel if transport == "responses" else OpenAIChatCompletionsModel
        # told to answer once it has the result: with tools still offered (tool_choice auto after the reset),
        # SmolLM2 otherwise calls again
        agent = Agent(name="weather", instructions="Call get_weather once. When you have its result, answer the "
                                                   "user in one sentence with that result.",
                      model=model_class(model=BASE, openai_client=client), tools=[get_weather],
                      model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60))
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        streamed = None
        if transport == "responses":
            run_streamed = Runner.run_streamed(agent, "What is the weather in Rome?", max_turns=4)
            async for _ in run_streamed.stream_events():
                pass
            streamed = run_streamed.final_output
        await client.close()
        return result, streamed

    result, streamed = asyncio.run(run())
    assert calls and calls[0].strip().lower().startswith("paris"), calls
    assert isinstance(result.final_output, str) and result.final_output.strip()
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    if transport == "responses":
        assert isinstance(streamed, str) and streamed.strip() and len(calls) >= 2


def test_an_engine_failure_mid_stream_is_an_error_event_then_response_failed(tiny_folder, tmp_path, monkeypatch):
    """A fault in the engine after the first tokens: the stream says so in the events clients parse (an
    `error` event, then response.failed with the output so far), never a completed response."""
    from server.engine import engine as engine_module
    from tests.support import in_process

    real, steps = engine_module.sample_batch, []

    def failing_on_the_third_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("injected sampling fault")
        return real(*args, **kwargs)

    with in_process(tiny_folder, tmp_path / "data", router=False) as (state, client):
        monkeypatch.setattr(engine_module, "sample_batch", failing_on_the_third_step)
        with client.stream("POST", "/v1/responses", json={"model": state.base.name, "input": "Hi",
                                                          "max_output_tokens": 20, "stream": True}) as reply:
            events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    assert kinds[0] == "response.created" and kinds[-2:] == ["error", "response.failed"], kinds
    assert "response.output_text.delta" in kinds and "response.completed" not in kinds, " ".join(kinds)
    assert "injected sampling fault" in events[-2]["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "injected sampling fault" in failed["error"]["message"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_stored_responses_are_bounded_oldest_first_and_survive_a_restart(tmp_path):
    from server.jobs.response_store import ResponseStore, new_response_id

    import time

    def later_id():  # ids order by their microsecond; two in the same one would order at random
        time.sleep(0.002)
        return new_response_id()

    store = ResponseStore(tmp_path, max_stored=3)
    ids = [later_id() for _ in range(5)]
    for number, response_id in enumerate(ids):
        store.put(response_id, {"n": number})
    assert [store.get(i) for i in ids] == [None, None, {"n": 2}, {"n": 3}, {"n": 4}]
    assert store.delete(ids[3]) and not store.delete(ids[3]) and not store.delete("../etc/passwd")
    again = ResponseStore(tmp_path, max_stored=3)  # a restart reads back what is kept, in creation order
    assert len(again) == 2
    again.put(newer := later_id(), {"n": 5})
    again.put(later_id(), {"n": 6})
    assert again.get(ids[2]) is None and again.get(newer) == {"n": 5} and len(again) == 3
    nothing = ResponseStore(tmp_path / "off", max_stored=0)  # max_stored_responses 0: nothing kept
    nothing.put(new_response_id(), {"n": 0})
    assert len(nothing) == 0 and not list((tmp_path / "off").iterdir())
