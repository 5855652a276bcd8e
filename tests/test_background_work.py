"""Lower-priority work (batch lines) beside interactive requests takes only the step time it is given:
the cost model (server/engine/step_cost.py) and the scheduler's pausing of rows it cannot pay for, on the
engine thread with a tiny model."""
import pytest

from server.engine.step_cost import Slack, StepCost
from tests.test_engine import PROMPTS, make_engine, make_seq, tiny_model  # noqa: F401 (fixture)
from tests.support.harness import wait_until


def _cost(points: dict[int, float], token_s: float | None = 0.001, slowdown: float = 1.1) -> StepCost:
    cost = StepCost(512, 2.0, slowdown)
    for rows, seconds in points.items():
        cost.observe(rows, 0, seconds)
    cost.token_s = token_s
    return cost


def test_where_every_row_costs_its_share_lower_priority_work_gets_a_tenth_of_the_step():
    cost = _cost({4: 0.040, 8: 0.080})  # a small CPU: 10 ms a row, nothing fixed
    assert cost.row_cost() == pytest.approx((0.0, 0.010))
    slack = cost.background_slack(8)
    assert slack.seconds == pytest.approx(0.008)  # a tenth of the 8 rows' own 80 ms
    assert not slack.take_row()  # a row (10 ms) would cost more than that
    assert slack.tokens() == 8  # 1 ms a prompt token
    assert cost.background_slack(8).take_row()  # the next step has the 8 ms saved and 8 more: a row
    assert cost.background_slack(8).seconds == pytest.approx(0.014)  # then what was left and 8 more
    fresh = _cost({4: 0.040, 8: 0.080})
    assert fresh.background_slack(16).take_row()  # at 16 rows a tenth pays for one more at once


def test_where_rows_are_nearly_free_lower_priority_work_fills_the_batch():
    cost = _cost({4: 0.01000, 8: 0.01001})  # a GPU: the step is its fixed cost
    slack = cost.background_slack(8)
    assert sum(slack.take_row() for _ in range(64)) == 64


def test_no_limit_without_best_priority_rows_or_when_switched_off():
    assert _cost({4: 0.04, 8: 0.08}).background_slack(0) is None
    assert _cost({4: 0.04, 8: 0.08}, slowdown=0).background_slack(8) is None
    # before a fit: every row is assumed to cost its share of the step seen, and no prompt tokens
    early = StepCost(512, 2.0, 1.1)
    early.observe(4, 0, 0.04)
    slack = early.background_slack(4)
    assert not slack.take_row() and slack.tokens() == 0


def test_rows_the_slack_cannot_pay_for_wait_with_their_blocks_and_end_with_their_solo_answer(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_batch=4)
    try:
        solo, done = make_seq(PROMPTS[2], max_tokens=20)
        engine.submit(solo)
        assert done.done.wait(60)
        engine._step_cost.background_slack = lambda rows: Slack(0.0, 1.0, None)  # no room at all
        interactive = [make_seq(prompt, max_tokens=40) for prompt in PROMPTS[:2]]
        for seq, _ in interactive:
            engine.submit(seq)
        assert wait_until(lambda: all(seq.generated >= 2 for seq, _ in interactive), 30, interval=0.001)
        low, low_out = make_seq(PROMPTS[2], max_tokens=20)
        low.priority = 10
        engine.submit(low)
        # while the interactive rows decode, the batch line is not even admitted (its prompt is not paid for)
        assert low_out.done.wait(120) and low_out.text == done.text  # then it runs alone, to the same answer
        assert all(out.done.is_set() for _, out in interactive)
        # (timestamps, not a poll: a poll that wakes late on a busy machine would see the batch line running)
        assert low.admitted_time >= max(seq.finish_time for seq, _ in interactive) and low.preemptions == 0
    finally:
        engine.stop()


def test_without_a_limit_lower_priority_rows_share_every_step(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_batch=4, background_slowdown=0)
    try:
        interactive, out = make_seq(PROMPTS[0], max_tokens=60)
        engine.submit(interactive)
        assert wait_until(lambda: interactive.generated >= 2, 30, interval=0.001)
        low, low_out = make_seq(PROMPTS[2], max_tokens=20)
        low.priority = 10
        engine.submit(low)
        assert low_out.done.wait(60)
        assert not out.done.is_set()  # it ran beside the interactive one, in the same steps
        assert out.done.wait(60)
    finally:
        engine.stop()


def test_lower_priority_rows_that_cost_more_than_priced_get_less_room():
    cost = _cost({4: 0.040, 8: 0.080})  # 10 ms a row, 1 ms a prompt token
    assert _cost({4: 0.040, 8: 0.080}).background_slack(16).take_row()  # 16 ms of slack pays for one 10 ms row
    for _ in range(30):  # steps of 16 best-priority rows and one lower-priority row took 190 ms, not 170
        cost.observe(17, 0, 0.190, background=(16, 0, 1, 0))
    assert cost.background_factor == pytest.approx(3.0, rel=0.05)
    assert not cost.background_slack(16).take_row()  # that row costs 30 ms: no longer within a step's slack
    assert cost.background_slack(16).take_row()  # but two steps' saved slack pay for it
    assert cost.decode_by_rows == {4: 0.040, 8: 0.080}  # and those steps do not count as best-priority ones


def test_saved_slack_is_bounded_and_forgotten_when_nothing_of_the_best_priority_decodes():
    cost = _cost({4: 0.040, 8: 0.080})
    for _ in range(100):
        slack = cost.background_slack(8)  # nothing spent
    assert slack.seconds == pytest.approx(16 * 0.008)
    assert cost.background_slack(0) is None
    assert cost.background_slack(8).seconds == pytest.approx(0.008)
