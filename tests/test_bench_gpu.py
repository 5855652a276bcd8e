"""The GPU kit's three scripts, run for real on a tiny model on CPU by loadtests/gpu_run.sh --cpu (the H200 run
is the same code), under an interpreter that sees only the device image's packages plus the carried wheels
(loadtests/image_env.py): a lent GPU is never spent on a broken script or a missing import."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from loadtests.bench_gpu import markdown, mode_adapters, ratios
from tests.support.harness import REPO


@pytest.fixture(scope="module")
def kit(image_python, tmp_path_factory):
    """`bash loadtests/gpu_run.sh OUT --cpu` once: OUT's files, with each stage's archive unpacked."""
    out = tmp_path_factory.mktemp("kit") / "out"
    env = {**os.environ, "PYTHON": str(image_python), "KIT_WHEELS": str(out / "no-wheels"),
           "KIT_LIMITS": "240 240 240", "PYTHONPATH": ""}
    done = subprocess.run(["bash", "loadtests/gpu_run.sh", str(out), "--cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
    for stage in ("smoke", "e2e", "bench"):
        if (out / f"{stage}.tgz").is_file():
            with tarfile.open(out / f"{stage}.tgz") as archive:
                archive.extractall(out / "unpacked", filter="data")
    return done, out


def _run(out_dir, *extra):
    cmd = [sys.executable, "-m", "loadtests.bench_gpu", str(out_dir), "--shape", "tiny", "--device", "cpu",
           "--batches", "1,4", "--prompt", "16", "--tokens", "8", *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out_dir / "summary.json").read_text())


def test_the_kit_runs_every_stage_and_leaves_few_files(kit):
    done, out = kit
    log = (out / "run.log").read_text()
    assert done.returncode == 0, log[-4000:]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "bench.md", "bench.tgz", "e2e.md", "e2e.tgz", "run.log", "smoke.md", "smoke.tgz"]  # the device tool returns 8
    for stage in ("smoke", "e2e", "bench"):
        assert f"== {stage}: passed" in log


def test_a_stage_past_its_time_limit_is_stopped_and_the_next_one_runs(image_python, tmp_path):
    """Each stage under its own limit (here 3 s: none can finish): stopped, said so, packed, and the kit goes
    on to the next stage and ends with a failure, never a hang."""
    env = {**os.environ, "PYTHON": str(image_python), "KIT_WHEELS": str(tmp_path / "none"), "KIT_LIMITS": "3 3 3",
           "PYTHONPATH": ""}
    done = subprocess.run(["bash", "loadtests/gpu_run.sh", str(tmp_path / "out"), "--cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    log = (tmp_path / "out" / "run.log").read_text()
    assert done.returncode != 0
    for stage in ("smoke", "e2e", "bench"):
        assert f"== {stage}: STOPPED at its 3s limit" in log
    assert "not passed: smoke e2e bench" in log


def test_tiny_run_measures_every_mode_and_writes_as_it_goes(kit):
    out = kit[1] / "unpacked" / "bench"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["adapter_load_ms"]) == 8 and all(ms > 0 for ms in summary["adapter_load_ms"])
    runs = {(run["batch"], run["mode"]): run for run in summary["runs"]}
    assert set(runs) == {(b, m) for b in (1, 4) for m in ("none", "one", "mixed8")}
    for (batch, _), run in runs.items():
        assert run["output_tokens"] == batch * 8  # no early stop: every request makes all its tokens
        assert run["full_batch_steps"] >= 1 and run["decode_tokens_per_s"] > 0 and run["peak_gib"] > 0
    assert [row["batch"] for row in summary["ratios"]] == [1, 4]
    assert all("mixed8_vs_one_decode" in row for row in summary["ratios"])
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8 + 6  # one line per adapter load and per throughput load
    assert "| 4 | mixed8 |" in (out / "summary.md").read_text()
    assert "done" in (out / "progress.log").read_text()


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


def test_the_gpu_smoke_script_passes_every_check_on_a_tiny_model(kit):
    """The checks the first GPU minutes run (loadtests/gpu_smoke.py)."""
    out = kit[1] / "unpacked" / "smoke"
    records = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert all(r.get("ok") for r in records), [r for r in records if not r.get("ok")]
    assert [r["check"] for r in records] == ["versions", "nf4_linear", "runner", "engine", "sampling", "slots",
                                             "adapter_load", "profile", "peft", "lora_kernels", "cuda_graphs"]  # Triton interpreted
    by_check = {r["check"]: r for r in records}
    assert by_check["sampling"]["ms_batch64_top_p_0.9"] > 0
    loads = by_check["adapter_load"]["loads"]  # the first load zeroes the never-used slot once; later: rank 16 of 64
    assert loads[0]["slot_bytes_written"] > loads[1]["slot_bytes_written"] == loads[2]["slot_bytes_written"]
    assert loads[1]["slot_bytes_written"] * 3 < by_check["adapter_load"]["slot_mib"] * 2**20
    assert by_check["engine"]["cancelled_finished"] is False and by_check["engine"]["errors"] == {}
    assert by_check["peft"]["adapter_effect_min"] > 0.01  # the comparison can tell adapters apart
    assert by_check["profile"]["operators_per_step"] > 0 and (out / "profile.txt").is_file()
    assert by_check["lora_kernels"]["decode_ms_batch8_triton"] > 0
    assert by_check["cuda_graphs"]["captured"] is False and by_check["cuda_graphs"]["shapes"]  # the static step ran
    assert "| peft | yes |" in (out / "smoke.md").read_text() and (kit[1] / "smoke.md").is_file()


def test_the_e2e_check_drives_the_real_server_over_http(kit):
    """loadtests/gpu_e2e.py: `loraplex serve` (started by the image's interpreter too) on a tiny NF4 base."""
    out = kit[1] / "unpacked" / "e2e"
    records = {r["step"]: r for r in map(json.loads, (out / "e2e.jsonl").read_text().splitlines())}
    assert list(records) == ["start", "register", "answers", "mixed", "retire", "metrics"]
    assert all(r["ok"] for r in records.values()), [r for r in records.values() if not r["ok"]]
    assert records["answers"]["stream_matches_plain"] and records["answers"]["expert_differs_from_base"]
    assert records["mixed"]["answered"] == records["mixed"]["requests"] == 9
    assert records["retire"]["retired_request_status"] == 404 and records["metrics"]["retired_series_gone"]
    assert any("KV cache" in line for line in records["start"]["log"])
    assert "Uvicorn running" in (out / "server.log").read_text()
