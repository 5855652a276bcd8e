"""Does the mixture of experts pay off? The skill experts against the base on prompts with right answers.

    python -m loadtests.bench_moe [--url http://127.0.0.1:8000] [--per-skill 24]

Runs `loraplex serve` on configs/default.yaml (the default SmolLM2-135M base, NF4, the five skill
experts of training/demo/skills.py beside json-answer, pirate and terse), or talks to --url, with
the openai client over HTTP, greedy (temperature 0). Every answer is graded by a program
(training/demo/skills.py: the marked or last number, the last weekday named, the first JSON object,
the first SQL statement run in SQLite against the fixed table).

Sets, none used to train or to tune the router:
- mixed: per skill, --per-skill prompts from the generator's held-out phrasings, names and items
  (`split="heldout"`, seed 1; the experts trained on `split="train"`, seed 0) plus 8 hand-written
  prompts in other words (loadtests/data/moe_eval.json). Served by: the base; each skill expert on
  every prompt; `auto` (the router's choice); `auto` with router_top_k 2; the oracle is each prompt's
  own expert (read off the expert runs).
- two-skill: prompts that need two skills at once (a unit conversion plus a sum; a sum of days plus a
  weekday), generated here. Served by the base, each of the two experts, their mixture `a+b`,
  `auto` (top-1) and `auto` with router_top_k 2.
- everyday: prompts that need no skill (the demo experts' held-out questions, training/demo/prompts.py,
  and 30 hand-written ones): the base and `auto`, compared by end of turn, length and form (does the
  answer look like a skill's answer: "The answer is", a JSON object, a SELECT).
- routing (POST /v1/route, the server's own settings): the mixed prompts' routed-right rate, and the
  share of off-topic prompts left on the base: the everyday set, and the test and off-topic prompts of
  loadtests/data/router_eval_styles.json (written for another benchmark, before these experts).
Writes loadtests/results/bench_moe.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai

from loadtests.provenance import stamp
from tests.support.harness import REPO, ServerProcess
from training.demo.prompts import held_out_prompts
from training.demo.skills import DAYS, SKILLS, employees_db, generate, grade, sql_of

DATA = Path(__file__).resolve().parent / "data"
SKILL_TOKENS = 128
EVERYDAY_TOKENS = 512
CONCURRENCY = 16
FORM = re.compile(r"answer is|^\s*\{|\bSELECT\b.*\bFROM\b", re.IGNORECASE | re.DOTALL)


# ---- the sets -----------------------------------------------------------------------------

def mixed_set(per_skill: int) -> list[dict]:
    hand = json.loads((DATA / "moe_eval.json").read_text())["skills"]
    cases = []
    for skill in SKILLS:
        cases += [{"skill": skill, "source": "generated", "prompt": item.prompt, "gold": item.gold}
                  for item in generate(skill, "heldout", per_skill, seed=1)]
        cases += [{"skill": skill, "source": "hand-written", "prompt": prompt, "gold": gold}
                  for prompt, gold in hand[skill]]
    return cases


def two_skill_set(count: int = 16) -> list[dict]:
    """Prompts needing two skills: units + arithmetic (two quantities in one unit, the total in another),
    weekday + arithmetic (two stretches of days added, then the weekday)."""
    rng = random.Random(7)
    pairs = [("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
             ("liters", "milliliters", 1000), ("weeks", "days", 7), ("feet", "inches", 12)]
    units_sum = ["{n} walked {a} {big} in the morning and {b} {big} in the afternoon. How many {small} is that in "
                 "total?", "One box weighs {a} {big} and another weighs {b} {big}. What is their total in {small}?",
                 "I spent {a} {big} on Monday and {b} {big} on Tuesday. How many {small} did I spend altogether?"]
    days_sum = ["Today is {d}. I travel for {a} days and then rest for {b} days. What day of the week is it when I "
                "finish resting?", "A project starts on a {d}. The first phase takes {a} days and the second {b} "
                "days. On what weekday does it end?"]
    names = ["Ana", "Bruno", "Chen", "Dara"]
    cases = []
    for i in range(count):
        big, small, factor = pairs[i % len(pairs)]
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        prompt = units_sum[i % len(units_sum)].format(n=names[i % 4], a=a, b=b, big=big, small=small)
        cases.append({"skills": ["units", "arithmetic"], "skill": "units", "prompt": prompt, "gold": (a + b) * factor})
    for i in range(count):
        start, a, b = rng.randrange(7), rng.randint(2, 12), rng.randint(2, 12)
        prompt = days_sum[i % len(days_sum)].format(d=DAYS[start], a=a, b=b)
        cases.append({"skills": ["weekday", "arithmetic"], "skill": "weekday", "prompt": prompt,
                      "gold": DAYS[(start + a + b) % 7]})
    return cases


def everyday_set() -> list[str]:
    return held_out_prompts() + json.loads((DATA / "moe_eval.json").read_text())["everyday"]


def off_topic_set() -> dict[str, list[str]]:
    styles = json.loads((DATA / "router_eval_styles.json").read_text())
    return {"everyday": everyday_set(),
            "router_eval_styles": [p for e in styles["experts"].values() for p in e["test"]] + styles["off_topic"]}


def check_data() -> None:
    """The hand-written golds are what the graders accept from a right answer."""
    hand = json.loads((DATA / "moe_eval.json").read_text())["skills"]
    db = employees_db()
    for skill, cases in hand.items():
        for prompt, gold in cases:
            if skill == "sql":
                assert sql_of(gold) and db.execute(gold).fetchall(), prompt
                assert grade("sql", gold, gold)
            elif skill == "extract":
                assert grade("extract", json.dumps(gold), gold), prompt
            elif skill == "weekday":
                assert grade("weekday", f"The answer is {gold}.", gold), prompt
            else:
                assert grade(skill, f"The answer is {gold}.", gold), prompt
    print("hand-written golds: ok")


# ---- serving ------------------------------------------------------------------------------

async def _ask(client: openai.AsyncOpenAI, gate: asyncio.Semaphore, model: str, prompt: str, tokens: int,
               top_k: int | None = None) -> dict:
    async with gate:
        extra = {"router_top_k": top_k} if top_k else None
        response = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=tokens,
            extra_body=extra)
    choice = response.choices[0]
    return {"text": choice.message.content or "", "finish": choice.finish_reason, "served_by": response.model,
            "tokens": response.usage.completion_tokens}


async def _run(client, gate, model: str, prompts: list[str], tokens: int, top_k: int | None = None) -> list[dict]:
    return list(await asyncio.gather(*(_ask(client, gate, model, p, tokens, top_k) for p in prompts)))


async def _route(http: httpx.AsyncClient, gate: asyncio.Semaphore, prompt: str) -> dict:
    async with gate:
        response = await http.post("/v1/route", json={"model": "auto",
                                                      "messages": [{"role": "user", "content": prompt}]})
    response.raise_for_status()
    return response.json()


# ---- scoring ------------------------------------------------------------------------------

def accuracy(cases: list[dict], answers: list[dict], key: str = "skill") -> float:
    return statistics.fmean(grade(c[key], a["text"], c["gold"]) for c, a in zip(cases, answers)) if cases else 0.0


def by_skill(cases: list[dict], answers: list[dict]) -> dict[str, float]:
    return {skill: accuracy([c for c in cases if c["skill"] == skill],
                            [a for c, a in zip(cases, answers) if c["skill"] == skill]) for skill in SKILLS}


def two_skill_accuracy(cases: list[dict], answers: list[dict]) -> float:
    # graded by the skill of the final answer (units: a number; weekday: a day)
    return statistics.fmean(grade("arithmetic" if c["skill"] == "units" else "weekday", a["text"], c["gold"])
                            for c, a in zip(cases, answers))


def everyday_stats(answers: list[dict]) -> dict:
    return {"end_of_turn": statistics.fmean(a["finish"] == "stop" for a in answers),
            "mean_tokens": statistics.fmean(a["tokens"] for a in answers),
            "skill_form": statistics.fmean(bool(FORM.search(a["text"])) for a in answers)}


def served_share(answers: list[dict], base: str) -> float:
    return statistics.fmean(a["served_by"] != base for a in answers)


async def _base_when_ready(client, http: httpx.AsyncClient) -> str:
    """The base's name, once the server serves every skill expert and its router is ready."""
    models = [m.id for m in (await client.models.list()).data]
    base = next(m for m in models if m not in SKILLS and m not in ("json-answer", "pirate", "terse", "auto"))
    missing = [s for s in SKILLS if s not in models]
    if missing:
        raise SystemExit(f"the server does not serve {missing}: train them (python -m training.demo.train_skills)")
    # the server answers before its router has encoded the experts' examples; until then /v1/route and
    # `auto` send everything to the base (a first run measured routed-right 0.00, off-topic on base 1.00)
    deadline = time.monotonic() + 600
    while (await http.get("/health")).json().get("router") != "ready":
        if time.monotonic() > deadline:
            raise SystemExit("the router is not ready after 600 s: " + (await http.get("/health")).text)
        await asyncio.sleep(1)
    return base


async def measure(url: str, per_skill: int) -> dict:
    mixed, two, everyday, off_topic = mixed_set(per_skill), two_skill_set(), everyday_set(), off_topic_set()
    gate = asyncio.Semaphore(CONCURRENCY)
    out: dict = {"sets": {"mixed": len(mixed), "two_skill": len(two), "everyday": len(everyday),
                          **{f"off_topic_{k}": len(v) for k, v in off_topic.items()}}}
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=1200) as client, \
            httpx.AsyncClient(base_url=url, timeout=120) as http:
        out["base_model"] = base = await _base_when_ready(client, http)
        start = time.perf_counter()

        # routing first: cheap, and it says what `auto` will do
        routes = await asyncio.gather(*(_route(http, gate, c["prompt"]) for c in mixed))
        chosen = [r["decision"]["expert"] for r in routes]
        routing = {"mixed_routed_right": statistics.fmean(c["skill"] == m for c, m in zip(mixed, chosen))}
        for source in ("generated", "hand-written"):
            pairs = [(c, m) for c, m in zip(mixed, chosen) if c["source"] == source]
            routing[f"mixed_routed_right_{source}"] = statistics.fmean(c["skill"] == m for c, m in pairs)
        routing["per_skill_routed_right"] = {s: statistics.fmean(m == s for c, m in zip(mixed, chosen)
                                                                 if c["skill"] == s) for s in SKILLS}
        for name, prompts in off_topic.items():
            decided = await asyncio.gather(*(_route(http, gate, p) for p in prompts))
            routing[f"off_topic_on_base_{name}"] = statistics.fmean(d["decision"]["expert"] == base for d in decided)
            routing[f"off_topic_sent_to_{name}"] = {m: sum(d["decision"]["expert"] == m for d in decided)
                                                    for m in {d["decision"]["expert"] for d in decided} if m != base}
        out["routing"] = routing
        print(f"routing: mixed routed right {routing['mixed_routed_right']:.3f}; off-topic on base "
              + ", ".join(f"{k} {routing[f'off_topic_on_base_{k}']:.3f}" for k in off_topic), flush=True)

        prompts = [c["prompt"] for c in mixed]
        runs = {"base": await _run(client, gate, base, prompts, SKILL_TOKENS)}
        for skill in SKILLS:
            runs[skill] = await _run(client, gate, skill, prompts, SKILL_TOKENS)
            print(f"mixed set on {skill}: {by_skill(mixed, runs[skill])[skill]:.3f} on its own skill", flush=True)
        runs["auto"] = await _run(client, gate, "auto", prompts, SKILL_TOKENS)
        runs["auto_top2"] = await _run(client, gate, "auto", prompts, SKILL_TOKENS, top_k=2)
        oracle = [runs[c["skill"]][i] for i, c in enumerate(mixed)]
        matrix = {model: by_skill(mixed, answers) for model, answers in runs.items()}
        matrix["oracle"] = by_skill(mixed, oracle)
        overall = {model: accuracy(mixed, answers) for model, answers in runs.items()}
        overall["oracle"] = accuracy(mixed, oracle)
        hand = [i for i, c in enumerate(mixed) if c["source"] == "hand-written"]
        overall_hand = {model: accuracy([mixed[i] for i in hand], [answers[i] for i in hand])
                        for model, answers in {**runs, "oracle": oracle}.items()}
        out["mixed"] = {"accuracy": overall, "accuracy_hand_written": overall_hand, "per_skill": matrix,
                        "auto_served_by": _counts(runs["auto"]), "auto_top2_served_by": _counts(runs["auto_top2"]),
                        "samples": {model: [{"prompt": mixed[i]["prompt"], "reply": answers[i]["text"][:300]}
                                            for i in range(0, len(mixed), max(1, len(mixed) // 10))]
                                    for model, answers in runs.items() if model in ("base", "auto")}}
        print("mixed: " + ", ".join(f"{k} {v:.3f}" for k, v in overall.items()), flush=True)

        two_prompts = [c["prompt"] for c in two]
        two_out = {}
        for kind in (("units", "arithmetic"), ("weekday", "arithmetic")):
            idx = [i for i, c in enumerate(two) if tuple(c["skills"]) == kind]
            cases, subset = [two[i] for i in idx], [two_prompts[i] for i in idx]
            row = {}
            for label, model, top_k in (("base", base, None), (kind[0], kind[0], None), (kind[1], kind[1], None),
                                        (f"{kind[0]}+{kind[1]}", f"{kind[0]}+{kind[1]}", None),
                                        ("auto", "auto", None), ("auto_top2", "auto", 2)):
                answers = await _run(client, gate, model, subset, SKILL_TOKENS, top_k)
                row[label] = two_skill_accuracy(cases, answers)
                if model == "auto":
                    row[f"{label}_served_by"] = _counts(answers)
            two_out["+".join(kind)] = row
            print(f"two-skill {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)),
                  flush=True)
        out["two_skill"] = two_out

        out["everyday"] = await _everyday(client, http, gate, base, everyday)
        out["wall_s"] = time.perf_counter() - start
    return out


async def _loop_stops(http: httpx.AsyncClient) -> float:
    """Answers the server ended as loops so far (loraplex_loop_stops_total, every expert)."""
    text = (await http.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("loraplex_loop_stops_total{"))


async def _everyday(client, http, gate, base: str, everyday: list[str]) -> dict:
    """The everyday set on the base, then on `auto`; each answer that ended counted as ended by the model or
    as a loop (server/engine/loops.py: the server's loop_stops counter read around each run)."""
    before = await _loop_stops(http)
    base_day = await _run(client, gate, base, everyday, EVERYDAY_TOKENS)
    middle = await _loop_stops(http)
    auto_day = await _run(client, gate, "auto", everyday, EVERYDAY_TOKENS)
    after = await _loop_stops(http)
    day = {"base": {**everyday_stats(base_day), "ended_as_loop": (middle - before) / len(everyday)},
           "auto": {**everyday_stats(auto_day), "ended_as_loop": (after - middle) / len(everyday)},
           "auto_sent_to_an_expert": served_share(auto_day, base), "auto_served_by": _counts(auto_day),
           "same_text_as_base": statistics.fmean(a["text"] == b["text"] for a, b in zip(auto_day, base_day)),
           # what did not end, to be read: the answer's last words show whether it was going round
           "auto_ran_to_length": [{"prompt": prompt, "served_by": a["served_by"], "tail": a["text"][-300:]}
                                  for prompt, a in zip(everyday, auto_day) if a["finish"] != "stop"]}
    print(f"everyday: base {day['base']}, auto {day['auto']}", flush=True)
    return day


async def measure_everyday(url: str) -> dict:
    """The everyday part alone (--everyday-only), for a change that touches only how answers end."""
    gate = asyncio.Semaphore(CONCURRENCY)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=1200) as client, \
            httpx.AsyncClient(base_url=url, timeout=120) as http:
        return await _everyday(client, http, gate, await _base_when_ready(client, http), everyday_set())


def _counts(answers: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in answers:
        counts[a["served_by"]] = counts.get(a["served_by"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def targets(result: dict) -> dict:
    """The issue's goals, each with its figures and whether it is met."""
    acc, skills = result["mixed"]["accuracy"], result["mixed"]["per_skill"]
    out = {f"expert_vs_base_{s}": {"expert": skills[s][s], "base": skills["base"][s],
                                   "met": skills[s][s] >= skills["base"][s] + 0.30} for s in SKILLS}
    out["auto_vs_oracle"] = {"auto": acc["auto"], "oracle": acc["oracle"], "met": acc["auto"] >= 0.9 * acc["oracle"]}
    out["auto_vs_base"] = {"auto": acc["auto"], "base": acc["base"], "met": acc["auto"] >= 2 * acc["base"]}
    for kind, row in result["two_skill"].items():
        # a set nothing answers shows nothing: 0 >= 0 is no evidence that mixing helps, so it is not "met"
        answered = max(v for k, v in row.items() if isinstance(v, float)) > 0
        out[f"two_skill_{kind}"] = {"auto_top2": row["auto_top2"], "auto": row["auto"], "answered": answered,
                                    "met": answered and row["auto_top2"] >= row["auto"]}
    day = result["everyday"]
    out["everyday_end_of_turn"] = {"auto": day["auto"]["end_of_turn"], "base": day["base"]["end_of_turn"],
                                   "met": day["auto"]["end_of_turn"] >= 0.99
                                   and day["auto"]["end_of_turn"] >= day["base"]["end_of_turn"]
                                   and day["auto"]["skill_form"] <= day["base"]["skill_form"]}
    routing = result["routing"]
    off = min(v for k, v in routing.items() if k.startswith("off_topic_on_base_"))
    out["routing"] = {"routed_right": routing["mixed_routed_right"], "off_topic_on_base_min": off,
                      "met": routing["mixed_routed_right"] >= 0.90 and off >= 0.70}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `loraplex serve` on configs/default.yaml)")
    parser.add_argument("--per-skill", type=int, default=24, help="generated held-out prompts per skill")
    parser.add_argument("--threads", type=int, help="the server's CPU threads (OMP_NUM_THREADS); on a machine shared "
                        "with other work, 1 avoids threads waiting at every op's barrier for a descheduled peer")
    parser.add_argument("--check-data", action="store_true", help="only check the hand-written golds")
    parser.add_argument("--everyday-only", action="store_true", help="only the everyday set (base and auto), "
                        "written over the everyday part of --out; the rest of that file stays as it was measured "
                        "(a new --out file holds the everyday part alone)")
    parser.add_argument("--about", help="how the --url server was started, kept with the result (for a server "
                        "not on the default settings)")
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_moe.json"))
    args = parser.parse_args()
    check_data()
    if args.check_data:
        return
    server = None
    if args.url is None:
        workdir = Path(tempfile.mkdtemp(prefix="bench-moe-"))
        env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        server = ServerProcess(workdir, None, env=env).start()
    try:
        if args.everyday_only:
            everyday = asyncio.run(measure_everyday(args.url or server.base_url))
        else:
            result = asyncio.run(measure(args.url or server.base_url, args.per_skill))
    finally:
        if server is not None:
            server.stop()
    about = {"server": args.about} if args.about else {}
    if args.everyday_only:
        whole = Path(args.out).is_file()
        result = json.loads(Path(args.out).read_text()) if whole else {}
        result["everyday"] = {**everyday, "run": stamp("loadtests.bench_moe"), **about}
    else:
        whole, result = True, {**stamp("loadtests.bench_moe"), **about, **result}
    if whole:
        result["targets"] = targets(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result.get("targets", {}).items():
        print(f"{name}: {'met' if row['met'] else 'NOT met'} {row}")


if __name__ == "__main__":
    main()
