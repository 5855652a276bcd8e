"""The tenants' parts without a server: the SQLite store (keys hashed, revocation seen across processes),
the limiter's buckets and headers, and the scheduler's turns over tenants."""
import sqlite3
import subprocess
import sys

import torch

from server.engine.block_manager import BlockManager
from server.engine.sampling import SamplingParams, make_generator
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.tenants.limits import TenantLimiter
from server.tenants.principal import ANONYMOUS, OPERATOR, Principal
from server.tenants.store import Limits, TenantStore

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_keys_are_stored_only_as_salted_hashes_and_revocation_elsewhere_applies_at_once(tmp_path):
    store = TenantStore(tmp_path)
    tenant = store.create_tenant("acme")
    record, key = store.issue_key(tenant.id, "ci")
    _, other = store.issue_key(tenant.id, "ci")
    assert store.authenticate(key).tenant.id == tenant.id
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # same id, wrong secret
    assert store.authenticate("lpx-000000000000-" + key.split("-", 2)[2]) is None  # unknown id
    raw = sqlite3.connect(tmp_path / "tenants.sqlite3").execute("SELECT salt, hash FROM keys").fetchall()
    assert len({salt for salt, _ in raw}) == 2  # a salt per key
    assert all(key.split("-", 2)[2].encode() not in bytes(h) for _, h in raw)
    assert key.encode() not in (tmp_path / "tenants.sqlite3").read_bytes()
    # another process (the command line) revokes it: this process refuses it on the next check
    subprocess.run([sys.executable, "-c", "import sys; from server.tenants.store import TenantStore; "
                    f"TenantStore(sys.argv[1]).revoke_key('acme', '{record['id']}')", str(tmp_path)],
                   check=True, cwd=REPO_ROOT)
    assert store.authenticate(key) is None
    assert store.authenticate(other) is not None  # the tenant's other key still works


def test_rotation_replaces_the_key_and_usage_adds_up_per_day_tenant_and_model(tmp_path):
    store = TenantStore(tmp_path)
    tenant = store.create_tenant("acme", Limits(requests_per_minute=5))
    record, key = store.issue_key(tenant.id)
    new_record, new_key = store.rotate_key("acme", record["id"])
    assert store.authenticate(key) is None and store.authenticate(new_key).key_id == new_record["id"]
    store.add_usage(tenant.id, "pirate", 10, 3)
    store.add_usage(tenant.id, "pirate", 5, 2)
    store.add_usage(tenant.id, "terse", 1, 1)
    rows = TenantStore(tmp_path).usage(tenant.id)  # nothing yet: in memory until flushed
    assert rows == []
    rows = store.usage(tenant.id)
    assert [(r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        ("pirate", 2, 15, 5), ("terse", 1, 1, 1)]
    assert TenantStore(tmp_path).get_tenant("acme").limits.requests_per_minute == 5


def test_the_visibility_rule():
    a, b = Principal(tenant="a"), Principal(tenant="b")
    assert a.may_use("a") and a.may_use("") and not a.may_use("b")
    assert not a.may_change("") and a.may_change("a") and not b.owns("a")
    assert OPERATOR.may_use("a") and OPERATOR.owns("b")
    assert ANONYMOUS.may_use("") and not ANONYMOUS.may_use("a") and not ANONYMOUS.may_change("")


def test_limits_refuse_with_openai_headers_and_refill_over_the_minute():
    limiter, limits = TenantLimiter(), Limits(requests_per_minute=2, tokens_per_minute=100, max_concurrent=5)
    first = limiter.admit("t", limits, now=0.0)
    assert first.refused is None
    headers = dict(first.headers)
    assert headers[b"x-ratelimit-limit-requests"] == b"2" and headers[b"x-ratelimit-remaining-requests"] == b"1"
    assert headers[b"x-ratelimit-limit-tokens"] == b"100" and headers[b"x-ratelimit-reset-tokens"] == b"0ms"
    assert limiter.admit("t", limits, now=0.0).refused is None
    third = limiter.admit("t", limits, now=0.0)
    assert third.refused and "2 requests per minute" in third.refused and third.retry_after == 30
    assert limiter.admit("other", limits, now=0.0).refused is None  # per tenant
    assert limiter.admit("t", limits, now=30.0).refused is None  # one request refilled in 30 s
    tokens = Limits(tokens_per_minute=100)
    assert limiter.admit("u", tokens, now=30.0).refused is None
    limiter.charge_tokens("u", tokens, 150, now=30.0)  # over the budget: refused until it refills
    spent = limiter.admit("u", tokens, now=40.0)  # -50 + 10 s of refill (16.7): still empty
    assert spent.refused and "tokens per minute" in spent.refused and spent.retry_after == 21
    assert limiter.admit("u", tokens, now=61.0).refused is None


def test_concurrency_slots_are_given_back():
    limiter, limits = TenantLimiter(), Limits(max_concurrent=1)
    assert limiter.admit("t", limits).refused is None
    assert "at most 1 at once" in limiter.admit("t", limits).refused
    limiter.release("t")
    assert limiter.admit("t", limits).refused is None


def _seq(tenant: str, n: int) -> Sequence:
    seq = Sequence(f"{tenant}{n}", [1, 2, 3], None, SamplingParams(max_tokens=4), frozenset(),
                   make_generator(0, torch.device("cpu")), lambda out: None, tenant=tenant)
    seq.tokens = list(seq.prompt_ids)
    return seq


def test_a_flood_from_one_tenant_does_not_hold_every_batch_row():
    scheduler = Scheduler(max_batch_size=4, max_step_tokens=512, blocks=BlockManager(64, 4))
    flood = [_seq("a", n) for n in range(12)]
    scheduler.waiting.extend(flood + [_seq("b", 0), _seq("c", 0)])
    step = scheduler.schedule(lambda key, in_use: True)
    admitted = [seq.request_id for seq in step.admitted]
    assert admitted == ["a0", "b0", "c0", "a1"]  # in turns; a's own requests in their order
    # without tenants the order is arrival order, exactly
    plain = Scheduler(max_batch_size=2, max_step_tokens=512, blocks=BlockManager(64, 4))
    plain.waiting.extend([_seq("", n) for n in range(3)])
    assert [s.request_id for s in plain.schedule(lambda key, in_use: True).admitted] == ["0", "1"]


def _run(scheduler: Scheduler, step) -> dict[str, int]:
    """What the engine does with a step: its tokens computed, a token sampled where a prompt ended."""
    for seq, count in step.work:
        seq.num_computed += count
        scheduler.blocks.commit(seq)
        if seq.num_computed == len(seq.tokens):
            seq.tokens.append(0)
    return {seq.request_id: count for seq, count in step.work}


def test_a_tenant_with_fewer_rows_joins_a_step_before_another_tenants_next_request():
    """While a's requests run, b's new request joins the next step without a's next one (which would share its
    prefill step); a's running requests all go on, a prompt part-way through included."""
    scheduler = Scheduler(max_batch_size=4, max_step_tokens=16, blocks=BlockManager(64, 4))
    long_a = _seq("a", 0)
    long_a.tokens = long_a.prompt_ids = list(range(1, 41))  # 40 tokens: read 12 or so a step
    scheduler.waiting.extend([_seq("a", 9), long_a])
    assert _run(scheduler, scheduler.schedule(lambda key, in_use: True)) == {"a9": 3, "a0": 12}
    scheduler.waiting.extend([_seq("a", 1), _seq("b", 0)])
    # a holds two rows, b none: b joins, a1 waits; a9 decodes and a0 goes on reading its prompt
    assert _run(scheduler, scheduler.schedule(lambda key, in_use: True)) == {"a9": 1, "a0": 12, "b0": 3}
    assert [seq.request_id for seq in scheduler.waiting] == ["a1"]
    # b has nothing waiting: a's turn
    step = scheduler.schedule(lambda key, in_use: True)
    assert [seq.request_id for seq in step.admitted] == ["a1"]
    # one tenant alone is never held: its requests join together as before
    plain = Scheduler(max_batch_size=4, max_step_tokens=16, blocks=BlockManager(64, 4))
    plain.waiting.extend([_seq("", 0), _seq("", 1)])
    assert _run(plain, plain.schedule(lambda key, in_use: True)) == {"0": 3, "1": 3}


def test_priority_comes_first_and_tenants_take_turns_within_one_priority():
    """vLLM's priority (lower first) orders admission; tenant turns only reorder requests of equal priority."""
    scheduler = Scheduler(max_batch_size=5, max_step_tokens=512, blocks=BlockManager(64, 4))
    arrivals = [_seq("a", n) for n in range(4)] + [_seq("b", 0), _seq("b", 1)] + [_seq("c", 0)]
    for seq in arrivals:
        seq.priority = 10 if seq.tenant == "a" else 0  # a's flood is batch work; b and c interactive
    arrivals[3].priority = 0  # but one of a's requests is interactive, and it came before b's and c's
    for seq in arrivals:
        scheduler.add(seq)
    step = scheduler.schedule(lambda key, in_use: True)
    admitted = [seq.request_id for seq in step.admitted]
    # priority 0 first, in turns over a, b, c (first-come tenant first); then a's priority-10 requests
    assert admitted == ["a3", "b0", "c0", "b1", "a0"]


def test_one_tenants_waiting_requests_take_at_most_their_share_of_the_queue():
    import pytest

    from server.engine.engine import Engine, EngineConfig, QueueFull
    from server.metrics import Metrics

    engine = Engine(lambda: None, EngineConfig(max_queued=4, max_queued_per_tenant=2), Metrics())  # never started
    engine.submit(_seq("a", 0))
    engine.submit(_seq("a", 1))
    with pytest.raises(QueueFull):
        engine.submit(_seq("a", 2))
    engine.submit(_seq("b", 0))  # the rest of the queue is still open to another tenant
    engine.submit(_seq("", 0))  # and to requests of no tenant
