"""The GPU benchmark script, run for real on a tiny model on CPU (the H200 run is the same code)."""
import json
import subprocess
import sys

from loadtests.bench_gpu import markdown, mode_adapters, ratios
from loadtests.harness import REPO


def _run(out_dir, *extra):
    cmd = [sys.executable, "-m", "loadtests.bench_gpu", str(out_dir), "--shape", "tiny", "--device", "cpu",
           "--batches", "1,4", "--prompt", "16", "--tokens", "8", *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out_dir / "summary.json").read_text())


def test_tiny_run_measures_every_mode_and_writes_as_it_goes(tmp_path):
    summary = _run(tmp_path / "out")
    assert len(summary["adapter_load_ms"]) == 8 and all(ms > 0 for ms in summary["adapter_load_ms"])
    runs = {(run["batch"], run["mode"]): run for run in summary["runs"]}
    assert set(runs) == {(b, m) for b in (1, 4) for m in ("none", "one", "mixed8")}
    for (batch, _), run in runs.items():
        assert run["output_tokens"] == batch * 8  # no early stop: every request makes all its tokens
        assert run["full_batch_steps"] >= 1 and run["decode_tokens_per_s"] > 0 and run["peak_gib"] > 0
    assert [row["batch"] for row in summary["ratios"]] == [1, 4]
    assert all("mixed8_vs_one_decode" in row for row in summary["ratios"])
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8 + 6  # one line per adapter load and per throughput load
    assert "| 4 | mixed8 |" in (tmp_path / "out" / "summary.md").read_text()
    assert "done" in (tmp_path / "out" / "progress.log").read_text()


def test_time_budget_skips_loads_but_still_reports(tmp_path):
    summary = _run(tmp_path / "out", "--budget-s", "0")
    assert summary["runs"] == [] and len(summary["skipped"]) == 6
    assert "Skipped (time budget)" in (tmp_path / "out" / "summary.md").read_text()


def test_mixed_mode_spreads_adjacent_rows_over_adapters():
    names = [f"e{i}" for i in range(8)]
    assert mode_adapters("none", 3, names) == [None] * 3
    assert mode_adapters("one", 3, names) == ["e0"] * 3
    mixed = mode_adapters("mixed8", 16, names)
    assert set(mixed) == set(names) and all(a != b for a, b in zip(mixed, mixed[1:]))


def test_ratios_pair_modes_of_the_same_batch():
    def run(batch, mode, decode, e2e):
        return {"batch": batch, "mode": mode, "decode_tokens_per_s": decode, "e2e_tokens_per_s": e2e,
                "step_ms_median": 1.0, "peak_gib": 1.0}

    runs = [run(64, "none", 1000, 800), run(64, "one", 900, 700), run(64, "mixed8", 810, 700), run(8, "one", 10, 10)]
    rows = {row["batch"]: row for row in ratios(runs)}
    assert rows[64] == {"batch": 64, "mixed8_vs_one_decode": 0.9, "mixed8_vs_one_e2e": 1.0,
                        "one_vs_none_decode": 0.9, "one_vs_none_e2e": 0.875}
    assert rows[8] == {"batch": 8}  # nothing to pair with
    meta = {"device_name": "x", "shape": "7b", "layers": 8, "adapters": 8, "rank": 16, "date": "d",
            "memory_measure": "m"}
    text = markdown({"meta": meta, "adapter_load_ms": [1.0, 3.0], "runs": runs, "ratios": ratios(runs),
                     "skipped": []})
    assert "median 2.0 ms" in text and "| 64 | 0.9 | 1.0 | 0.9 | 0.875 |" in text


def test_the_gpu_smoke_script_passes_every_check_on_a_tiny_model(tmp_path):
    """The checks the first GPU minutes run (loadtests/gpu_smoke.py), run here on CPU so a lent GPU is
    never spent on a broken script."""
    out = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "loadtests.gpu_smoke", str(out), "--shape", "tiny", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert done.returncode == 0, [r for r in records if not r.get("ok")] or done.stderr[-3000:]
    assert [r["check"] for r in records] == ["versions", "nf4_linear", "runner", "engine", "sampling", "slots",
                                             "profile", "peft", "lora_kernels", "cuda_graphs"]  # Triton interpreted
    by_check = {r["check"]: r for r in records}
    assert by_check["sampling"]["ms_batch64_top_p_0.9"] > 0
    assert by_check["engine"]["cancelled_finished"] is False and by_check["engine"]["errors"] == {}
    assert by_check["peft"]["adapter_effect_min"] > 0.01  # the comparison can tell adapters apart
    assert by_check["profile"]["operators_per_step"] > 0 and (out / "profile.txt").is_file()
    assert by_check["lora_kernels"]["decode_ms_batch64_triton"] > 0
    assert by_check["cuda_graphs"]["captured"] is False and by_check["cuda_graphs"]["shapes"]  # the static step ran
    assert "| peft | yes |" in (out / "smoke.md").read_text()
