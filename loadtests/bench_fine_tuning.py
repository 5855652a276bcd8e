"""Fine-tuning over the API, measured as a user meets it (issue 17):

    python -m loadtests.bench_fine_tuning [--examples 1000] [--epochs 1]

On the default model, through the unmodified openai client against `loraplex serve`:
1. serving throughput with no job (4 clients streaming 48-token answers), the baseline;
2. files.create + fine_tuning.jobs.create of a ~1,000-conversation job, then the same load while it
   trains: the ratio is what a running job costs the users of the server;
3. seconds from jobs.create to the first streamed token of the new expert;
4. the new expert's end-of-turn rate on held-out prompts (its answers end with finish_reason "stop",
   not the token budget), and how often it shows the behaviour it was taught.

The taught behaviour: answer any question with one sentence that names its topic and ends in
"(checked)". Questions come from 40 topics x 30 phrasings; held-out prompts use topics and
phrasings the training file does not have. Writes loadtests/results/bench_fine_tuning.json.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import threading
import time
from pathlib import Path

from openai import OpenAI

from tests.support.harness import REPO, ServerProcess, run_together, wait_until
from loadtests.provenance import stamp

TOPICS = ["volcanoes", "tea", "bicycles", "the moon", "jazz", "bees", "chess", "rain", "glaciers", "bread",
          "owls", "trains", "copper", "tulips", "kites", "salt", "dolphins", "paper", "marathons", "coffee",
          "castles", "comets", "silk", "wolves", "clocks", "deserts", "violins", "maps", "honey", "bridges",
          "penguins", "cheese", "lighthouses", "tigers", "glass", "rivers", "saturn", "cotton", "pyramids", "apples"]
HELD_OUT_TOPICS = ["submarines", "mushrooms", "thunder", "origami", "camels", "tornadoes", "lemons", "satellites",
                   "coral", "typewriters"]
PHRASINGS = ["Tell me about {t}.", "What should I know about {t}?", "Explain {t} briefly.", "Why are {t} interesting?",
             "Give me a fact about {t}.", "I'm curious about {t}.", "Can you describe {t}?", "What are {t}?",
             "Teach me something about {t}.", "Say something about {t}.", "{t}: what's the story?",
             "Quick question about {t}.", "Help me understand {t}.", "What is special about {t}?",
             "Describe {t} in simple words.", "hey what do you know about {t}", "Share a thought on {t}.",
             "How would you sum up {t}?", "In one line, {t}?", "Talk to me about {t}.",
             "What comes to mind with {t}?", "Any insight on {t}?", "Is there anything neat about {t}?",
             "Write one sentence on {t}.", "My kid asked me about {t}. What do I say?", "Summarise {t} for me.",
             "What's the deal with {t}?", "Fill me in on {t}.", "Could you tell me about {t}, please?",
             "Break down {t} for a beginner."]
HELD_OUT_PHRASINGS = ["I've always wondered about {t}.", "Give me the gist of {t}.", "So, {t} - thoughts?",
                      "What would an expert say about {t}?", "Enlighten me on {t}."]
MARK = "(checked)"


def answer(topic: str) -> str:
    return f"{topic[0].upper() + topic[1:]} are a fine subject to study. {MARK}"


def training_file(count: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    pairs = [(t, p) for t in TOPICS for p in PHRASINGS]
    rng.shuffle(pairs)
    rows = []
    for topic, phrasing in (pairs * (count // len(pairs) + 1))[:count]:
        turns = [{"role": "user", "content": phrasing.format(t=topic)}, {"role": "assistant", "content": answer(topic)}]
        if rng.random() < 0.2:  # some multi-turn conversations: the second answer is learnt too
            other = rng.choice(TOPICS)
            turns += [{"role": "user", "content": rng.choice(PHRASINGS).format(t=other)},
                      {"role": "assistant", "content": answer(other)}]
        rows.append(json.dumps({"messages": turns}))
    return ("\n".join(rows) + "\n").encode()


def serving_load(client: OpenAI, model: str, seconds: float, clients: int = 4) -> float:
    """Generated tokens per second over `seconds` of `clients` back-to-back streaming requests."""
    deadline = time.monotonic() + seconds
    counts = [0] * clients

    def worker(i: int) -> None:
        while time.monotonic() < deadline:
            stream = client.chat.completions.create(model=model, stream=True, max_tokens=48, temperature=0.7,
                                                    stream_options={"include_usage": True},
                                                    messages=[{"role": "user", "content": f"Write about topic {i}."}])
            for chunk in stream:
                if chunk.usage is not None:
                    counts[i] += chunk.usage.completion_tokens

    started = time.monotonic()
    run_together([threading.Thread(target=worker, args=(i,)) for i in range(clients)])
    return sum(counts) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--out", default=str(REPO / "loadtests" / "results" / "bench_fine_tuning.json"))
    args = parser.parse_args()
    workdir = Path("/tmp") / f"bench-fine-tuning-{int(time.time())}"
    workdir.mkdir(parents=True)
    server = ServerProcess(workdir, {"max_batch_size": 8}, env={"LORAPLEX_ADMIN_KEY": "admin"}).start()
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="admin", max_retries=0, timeout=600)
        base = client.models.list().data[0].id
        idle = serving_load(client, base, args.load_seconds)
        print(f"idle serving: {idle:.1f} tokens/s")
        data = training_file(args.examples)
        created_at = time.monotonic()
        file = client.files.create(file=("checked.jsonl", io.BytesIO(data)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=base, training_file=file.id, suffix="checked", seed=0,
                                             hyperparameters={"n_epochs": args.epochs, "batch_size": 8},
                                             extra_body={"description": "Answers in one sentence marked (checked).",
                                                         "stop": []})
        assert wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 600, 0.5)
        busy = serving_load(client, base, args.load_seconds)
        print(f"serving while training: {busy:.1f} tokens/s ({busy / idle:.2f}x idle)")
        assert wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"),
                          7200, 1.0)
        job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        stream = client.chat.completions.create(model=job.fine_tuned_model, stream=True, max_tokens=8,
                                                messages=[{"role": "user", "content": "Tell me about maps."}])
        next(iter(stream))
        to_first_token = time.monotonic() - created_at
        stream.close()
        print(f"jobs.create -> first token of {job.fine_tuned_model}: {to_first_token:.0f} s")
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))  # the client pages through them all
        losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics"]
        held_out = [p.format(t=t) for t in HELD_OUT_TOPICS for p in HELD_OUT_PHRASINGS]
        stops = marked = 0
        for prompt in held_out:
            choice = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=64,
                                                    messages=[{"role": "user", "content": prompt}]).choices[0]
            stops += choice.finish_reason == "stop"
            marked += choice.message.content.strip().endswith(MARK)
        report = {
            **stamp("loadtests.bench_fine_tuning"), "examples": args.examples, "epochs": args.epochs,
            "steps": len(losses), "trained_tokens": job.trained_tokens,
            "serving_tokens_per_s_idle": idle, "serving_tokens_per_s_training": busy,
            "serving_ratio_training_vs_idle": busy / idle, "seconds_create_to_first_token": to_first_token,
            "held_out_prompts": len(held_out), "end_of_turn_rate": stops / len(held_out),
            "behaviour_rate": marked / len(held_out), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "fine_tune_threads": 1,
        }
        print(f"end-of-turn rate on {len(held_out)} held-out prompts: {report['end_of_turn_rate']:.3f} "
              f"(goal >= 0.99); taught behaviour {report['behaviour_rate']:.3f}")
        Path(args.out).write_text(json.dumps(report, indent=2))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
