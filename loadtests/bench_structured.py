"""Structured outputs benchmark (issues 18, 35): do constrained answers finish, what do constrained rows
cost a batch, and schema compile time.

    python -m loadtests.bench_structured [--rounds 3]
    python -m loadtests.bench_structured --finish-only --url http://127.0.0.1:8000 --label before

1. Finish rate on the default server (configs/default.yaml), with the unmodified openai client, greedy,
   max_tokens 200, on the base and on two demo experts (pirate, terse): the 32 schemas of
   loadtests/data/structured_schemas.json through response_format json_schema, 7 pydantic models
   through client.beta.chat.completions.parse(), and the 12 tools of loadtests/data/structured_tools.json
   (each offered with the next one) with tool_choice required, named and auto. Per answer: did it stop
   by itself, does a stopped answer validate (against the schema as the client wrote it; `closed`
   also against it with every declared object closed: no invented key), tokens used, and whether raw
   `<tool_call>` markup reached `content`. `--finish-only --url` measures another server (main's, for
   the before column) and stores it under `--label` in the same result file.
2. Decode at batch 16 on the real server (default SmolLM2): 16 free streams, against 8 free plus 8
   constrained by a JSON schema that keeps them generating (a long array of short strings); every
   row runs `--tokens` tokens (ignore_eos). Output tokens/s of the whole batch, and the free rows'
   median inter-token gap, alternated `--rounds` times; ratios constrained-half / none.
3. Grammar preparation for the schemas of loadtests/data/structured_schemas.json, in process on the
   same tokenizer: check + compile + a warmed matcher, p50 / p99, first time and again (llguidance
   keeps no compiled-grammar cache for us: the second time shows what a repeat costs).
Writes loadtests/results/bench_structured.json (keeping the finish runs of other labels already there).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
from pydantic import BaseModel, Field

from tests.support.harness import REPO, ServerProcess, run_together
from loadtests.loadgen import percentile
from loadtests.provenance import stamp

BASE = "SmolLM2-135M-Instruct"
SCHEMAS = json.loads((REPO / "loadtests" / "data" / "structured_schemas.json").read_text())["schemas"]
TOOLS = json.loads((REPO / "loadtests" / "data" / "structured_tools.json").read_text())["tools"]
MODELS = (BASE, "pirate", "terse")  # the base and two demo experts of configs/default.yaml
FINISH_MAX_TOKENS = 200
LONG_ARRAY = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                         "minItems": 200}}, "required": ["words"]}


# ---- 1. do constrained answers finish? ------------------------------------------------------


class Ingredient(BaseModel):
    name: str
    grams: int = Field(ge=1, le=5000)


class Recipe(BaseModel):
    title: str
    ingredients: list[Ingredient] = Field(min_length=1, max_length=5)
    minutes: int = Field(ge=1, le=600)


class Person(BaseModel):
    name: str
    age: int | None = None
    email: str | None = None


class Status(str, Enum):
    pending = "pending"
    shipped = "shipped"
    delivered = "delivered"


class Order(BaseModel):
    order_id: str
    status: Status
    items: list[str] = Field(max_length=4)


class Review(BaseModel):
    product: str
    stars: Literal[1, 2, 3, 4, 5]
    summary: str


class Address(BaseModel):
    street: str
    city: str
    country: str


class Company(BaseModel):
    name: str
    address: Address
    employees: int = Field(ge=1)


class Book(BaseModel):
    title: str
    author: str
    year: int = Field(ge=0, le=2100)
    genres: list[str] = Field(max_length=3)


class Meeting(BaseModel):
    topic: str
    day: Literal["monday", "tuesday", "wednesday", "thursday", "friday"]
    attendees: list[str] = Field(min_length=1, max_length=4)


PYDANTIC = [(Recipe, "Give me a pancake recipe."), (Person, "Describe a person named Ann."),
            (Order, "Create an order for two books that has shipped."), (Review, "Review a pair of headphones."),
            (Company, "Describe a bakery in Lyon."), (Book, "Tell me about a famous novel."),
            (Meeting, "Schedule a planning meeting.")]


def closed(schema):
    """The schema with every object that declares properties closed: for counting invented keys."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


def _validates(instance, schema) -> bool:
    try:
        jsonschema.validate(instance, schema)
        return True
    except jsonschema.ValidationError:
        return False


def _schema_row(client, model: str, item: dict) -> dict:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": item["prompt"]}], max_tokens=FINISH_MAX_TOKENS,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": item["name"],
                                                                                "schema": item["schema"]}})
    choice = reply.choices[0]
    row = {"name": item["name"], "finish_reason": choice.finish_reason, "tokens": reply.usage.completion_tokens}
    if choice.finish_reason == "stop":
        try:
            answer = json.loads(choice.message.content)
        except ValueError:
            answer = row["invalid_json"] = True
        row["valid"] = answer is not True and _validates(answer, item["schema"])
        row["closed"] = row["valid"] and _validates(answer, closed(item["schema"]))
    else:
        row["tail"] = (choice.message.content or "")[-80:]
    return row


def _pydantic_row(client, model: str, item) -> dict:
    cls, prompt = item
    try:
        reply = client.beta.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": prompt}], response_format=cls,
            max_tokens=FINISH_MAX_TOKENS, temperature=0)
    except openai.LengthFinishReasonError as exc:
        return {"name": cls.__name__, "finish_reason": "length", "tokens": exc.completion.usage.completion_tokens,
                "tail": (exc.completion.choices[0].message.content or "")[-80:]}
    except Exception as exc:  # the answer stopped but did not parse into the model
        return {"name": cls.__name__, "finish_reason": "stop", "tokens": None, "valid": False,
                "error": str(exc)[:120]}
    message = reply.choices[0].message
    return {"name": cls.__name__, "finish_reason": reply.choices[0].finish_reason,
            "tokens": reply.usage.completion_tokens, "valid": isinstance(message.parsed, cls), "closed": True}


def _tool_row(client, model: str, index: int, choice: str) -> dict:
    item, other = TOOLS[index], TOOLS[(index + 1) % len(TOOLS)]
    tools = [{"type": "function", "function": t["tool"]} for t in (item, other)]
    tool_choice = {"type": "function", "function": {"name": item["tool"]["name"]}} if choice == "named" else choice
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": item["prompt"]}], tools=tools, tool_choice=tool_choice,
        max_tokens=FINISH_MAX_TOKENS, temperature=0)
    answer = reply.choices[0]
    content = answer.message.content or ""
    row = {"name": item["tool"]["name"], "finish_reason": answer.finish_reason, "tokens": reply.usage.completion_tokens,
           "raw_markup": "<tool_call>" in content}
    calls = answer.message.tool_calls or []
    if answer.finish_reason == "tool_calls" and calls:
        schemas = {t["tool"]["name"]: t["tool"]["parameters"] for t in (item, other)}
        call = calls[0]
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = None
        schema = schemas.get(call.function.name)
        row["valid"] = schema is not None and arguments is not None and _validates(arguments, schema) and (
            choice != "named" or call.function.name == item["tool"]["name"])
        row["closed"] = row["valid"] and _validates(arguments, closed(schema))
        row["called"] = call.function.name
    elif answer.finish_reason == "stop":
        row["valid"] = choice == "auto"  # a text answer is a valid answer only where the model may choose text
        row["closed"] = row["valid"]
    if answer.finish_reason not in ("stop", "tool_calls"):
        row["tail"] = (content or (calls[0].function.arguments if calls else ""))[-80:]
    return row


def _summary(rows: list[dict]) -> dict:
    finished = [r for r in rows if r["finish_reason"] in ("stop", "tool_calls")]
    tokens = [r["tokens"] for r in rows if r["tokens"] is not None]
    return {"answers": len(rows), "finished": len(finished),
            "finish_rate": round(len(finished) / len(rows), 3) if rows else None,
            "valid_of_finished": round(sum(bool(r.get("valid")) for r in finished) / len(finished), 3) if finished
            else None,
            "valid_rate": round(sum(bool(r.get("valid")) for r in rows) / len(rows), 3) if rows else None,
            "no_invented_keys_of_finished": round(sum(bool(r.get("closed")) for r in finished) / len(finished), 3)
            if finished else None,
            "raw_markup_in_content": sum(bool(r.get("raw_markup")) for r in rows),
            "mean_tokens": round(statistics.mean(tokens), 1) if tokens else None}


def finish_rates(base_url: str, workers: int = 8) -> dict:
    """Every suite on every model, `workers` requests at a time (greedy: each answer is the same whatever
    it is batched with on this CPU's batch-invariant engine)."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    jobs = {"json_schema": [(_schema_row, item) for item in SCHEMAS],
            "pydantic_parse": [(_pydantic_row, item) for item in PYDANTIC],
            **{f"tools_{choice}": [(_tool_row, index, choice) for index in range(len(TOOLS))]
               for choice in ("required", "named", "auto")}}
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        futures = {(suite, model): [pool.submit(job[0], client, model, *job[1:]) for job in suite_jobs]
                   for suite, suite_jobs in jobs.items() for model in MODELS}
        rows = {key: [future.result() for future in batch] for key, batch in futures.items()}
    suites = {suite: {"models": {model: _summary(rows[(suite, model)]) for model in MODELS},
                      "all": _summary([r for model in MODELS for r in rows[(suite, model)]])}
              for suite in jobs}
    parse_like = [r for suite in ("json_schema", "pydantic_parse") for model in MODELS for r in rows[(suite, model)]]
    forced = [r for suite in ("tools_required", "tools_named") for model in MODELS for r in rows[(suite, model)]]
    return {"max_tokens": FINISH_MAX_TOKENS, "models": list(MODELS), "wall_s": round(time.perf_counter() - start, 1),
            "suites": suites, "structured_outputs": _summary(parse_like), "forced_tool_calls": _summary(forced),
            "unfinished": [{"suite": suite, "model": model, **r} for (suite, model), batch in rows.items()
                           for r in batch if r["finish_reason"] not in ("stop", "tool_calls") or not r.get("valid")]}


# ---- 2. what constrained rows cost a batch ----------------------------------------------------


def _stream(base_url: str, index: int, constrained: bool, tokens: int, record: dict) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": f"List words about topic {index}."}],
            "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "words", "schema": LONG_ARRAY}}
    times = []
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    record.update(times=times, constrained=constrained)


def batch(base_url: str, rows: int, constrained_rows: int, tokens: int) -> dict:
    records = [{} for _ in range(rows)]
    threads = [threading.Thread(target=_stream, args=(base_url, i, i < constrained_rows, tokens, records[i]))
               for i in range(rows)]
    wall = run_together(threads)
    free_gaps = [(b - a) * 1000 for r in records if not r["constrained"] for a, b in zip(r["times"], r["times"][1:])]
    return {"rows": rows, "constrained_rows": constrained_rows, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(rows * tokens / wall, 1),
            "free_gap_p50_ms": round(percentile(free_gaps, 50), 1)}


# ---- 3. schema compile time -----------------------------------------------------------------


def compile_times() -> dict:
    from transformers import AutoTokenizer

    from models.base_model import convert_embedded
    from server.api.protocol import ResponseFormat
    from server.api.structured import OutputFormats
    from server.settings import Settings

    tokenizer = AutoTokenizer.from_pretrained(convert_embedded(Settings().cache_dir))
    start = time.perf_counter()
    formats = OutputFormats(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    startup = time.perf_counter() - start
    runs: dict[str, list[float]] = {"first": [], "again": []}
    for label in runs:
        for item in SCHEMAS:
            fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
                "name": item["name"], "schema": item["schema"]}})
            start = time.perf_counter()
            formats.constraints(formats.for_response_format(fmt), 1)
            runs[label].append((time.perf_counter() - start) * 1000)
    return {"schemas": len(SCHEMAS), "startup_s": round(startup, 2), "cached": False,
            **{f"{label}_p50_ms": round(percentile(times, 50), 2) for label, times in runs.items()},
            **{f"{label}_p99_ms": round(percentile(times, 99), 2) for label, times in runs.items()}}


def _finish_run(base_url: str, argv: list[str] | None, label: str) -> dict:
    run = {**stamp("loadtests.bench_structured", argv), "label": label, **finish_rates(base_url)}
    print(label, json.dumps({k: run[k] for k in ("structured_outputs", "forced_tool_calls", "wall_s")}), flush=True)
    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--finish-only", action="store_true", help="only the finish-rate suite (part 1)")
    parser.add_argument("--url", help="measure the finish rate on this running server instead of starting one")
    parser.add_argument("--label", default="after", help="the name the finish-rate run is stored under")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "bench_structured.json")
    args = parser.parse_args(argv)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    finish = {k: v for k, v in previous.get("finish", {}).items() if k != args.label}
    if args.finish_only:
        if not args.url:
            parser.error("--finish-only needs --url (a running server)")
        result = {**previous, "finish": {**finish, args.label: _finish_run(args.url, argv, args.label)}}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    result: dict = {**stamp("loadtests.bench_structured", argv), "batch": {"none": [], "half": []}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            finish[args.label] = _finish_run(args.url, argv, args.label)
        else:  # the default server, as a user starts it
            server = ServerProcess(Path(tmp), None).start()
            try:
                finish[args.label] = _finish_run(server.base_url, argv, args.label)
            finally:
                server.stop()
        server = ServerProcess(Path(tmp), {"compute_dtype": "float32", "router": "none", "max_batch_size": 16}).start()
        try:
            batch(server.base_url, 16, 8, 8)  # warm-up: the grammar's lexer states, the kernels
            for _ in range(args.rounds):  # alternated: this machine's speed drifts
                for name, constrained in (("none", 0), ("half", 8)):
                    result["batch"][name].append(batch(server.base_url, 16, constrained, args.tokens))
                    print(name, result["batch"][name][-1], flush=True)
        finally:
            server.stop()
    result["compile"] = compile_times()
    print(result["compile"])
    median = {name: {key: statistics.median(run[key] for run in runs) for key in ("output_tokens_per_s",
                                                                                 "free_gap_p50_ms")}
              for name, runs in result["batch"].items()}
    result["median"] = median
    result["ratios"] = {
        "throughput_half_over_none": round(median["half"]["output_tokens_per_s"] / median["none"]["output_tokens_per_s"], 3),
        "free_gap_none_over_half": round(median["none"]["free_gap_p50_ms"] / median["half"]["free_gap_p50_ms"], 3),
    }
    result["finish"] = finish
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    return result


if __name__ == "__main__":
    main()
