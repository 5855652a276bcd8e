"""The mainstream clients, unmodified, against the real server: structured outputs and tools as each
framework sends them, on the base and on an expert (one shared server, a few requests each).

openai (parse, tools, streamed tools), LangChain (with_structured_output, bind_tools) and pydantic-ai
(an output type with a tool). instructor is not here: its releases pin an older openai than the one the
suite uses. LiteLLM is not either: it pulls in boto3 and fetches a price map at import unless told
not to, too heavy for a few requests."""
import asyncio
import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support import BASE

pytestmark = pytest.mark.integration

MODELS = [BASE, "alpha"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}


class City(BaseModel):
    name: str
    country: str
    population: int = Field(ge=0, le=100_000_000)


class Weather(BaseModel):
    city: str
    summary: str


@pytest.mark.parametrize("model", MODELS)
def test_openai_parse_returns_the_pydantic_object(client, model):
    reply = client.beta.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Tell me about Paris."}], response_format=City,
        max_tokens=120, temperature=0)
    assert isinstance(reply.choices[0].message.parsed, City)


@pytest.mark.parametrize("model", MODELS)
def test_openai_tools_and_streamed_tools_agree(client, model):
    kwargs = dict(model=model, messages=[{"role": "user", "content": "What's the weather in Oslo in celsius?"}],
                  tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0)
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    streamed = {"name": "", "arguments": "", "ids": set()}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for part in chunk.choices[0].delta.tool_calls or []:
            streamed["ids"].add(part.id) if part.id else None
            streamed["name"] += part.function.name or ""
            streamed["arguments"] += part.function.arguments or ""
    assert streamed["name"] == call.function.name == "get_weather" and len(streamed["ids"]) == 1
    assert json.loads(streamed["arguments"]) == json.loads(call.function.arguments)
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}


@pytest.fixture(scope="module")
def langchain_chat(server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    return lambda model: ChatOpenAI(model=model, base_url=server.base_url + "/v1", api_key="unused", temperature=0,
                                    max_tokens=120, max_retries=0, timeout=120)


@pytest.mark.parametrize("model", MODELS)
def test_langchain_with_structured_output_and_bind_tools(langchain_chat, model):
    chat = langchain_chat(model)
    city = chat.with_structured_output(City).invoke("Tell me about Rome.")
    assert isinstance(city, City)
    message = chat.bind_tools([WEATHER], tool_choice="any").invoke("What's the weather in Oslo in celsius?")
    assert not message.content and not message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}


@pytest.mark.parametrize("model", MODELS)
def test_pydantic_ai_answers_with_its_output_type_after_one_tool_call(server, model):
    """pydantic-ai sends its output type as a `final_result` tool with tool_choice required; the agent
    used to call get_weather ~40 times instead of answering after its result."""
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    requests = []

    async def count(request):
        requests.append(request)

    async def run():
        http = httpx.AsyncClient(event_hooks={"request": [count]}, timeout=120)
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", http_client=http,
                                    max_retries=0)
        agent = Agent(OpenAIChatModel(model, provider=OpenAIProvider(openai_client=client)), output_type=Weather)
        calls = []

        @agent.tool_plain
        def get_weather(city: str) -> str:
            """Current weather in a city."""
            calls.append(city)
            return f"Sunny, 21 C in {city}"

        result = await agent.run("What is the weather in Paris?",
                                 model_settings={"max_tokens": 120, "temperature": 0})
        await http.aclose()
        return result.output, calls

    output, calls = asyncio.run(run())
    assert isinstance(output, Weather)
    assert len(calls) <= 1 and len(requests) <= 3, (calls, len(requests))
