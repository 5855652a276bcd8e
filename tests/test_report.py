"""The README's Performance section is generated from the result files, and stays in step with them."""
import json

import loadtests.report as report


def test_readme_matches_the_committed_results():
    assert report.main(["--check"]) == 0, "run: python -m loadtests.report --write"


def test_every_figure_names_its_command_machine_and_date():
    section = report.performance()
    for command in ("python -m loadtests.bench_serving", "python -m loadtests.run_scenarios",
                    "python -m loadtests.bench_registry", "python -m loadtests.bench_router",
                    "python -m loadtests.bench_experts", "python -m loadtests.bench_gpu"):
        assert command in section
    for name in ("bench_registry.json", "bench_router.json", "scenarios.json"):
        result = json.loads((report.RESULTS / name).read_text())
        assert f"{result['date'][:10]}, {result['machine']}" in section


def test_missing_results_say_how_to_measure_them(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.performance()
    assert section.count("Not measured yet") == len(report.SECTIONS)
    assert "run `make bench`" in section and "run `python -m loadtests.bench_router`" in section


def test_a_gpu_run_appears_with_its_device(tmp_path, monkeypatch):
    run = {"batch": 64, "mode": "mixed8", "step_ms_median": 16.0, "decode_tokens_per_s": 4000.0,
           "e2e_tokens_per_s": 3000.0, "peak_gib": 9.5}
    summary = {"meta": {"command": "python -m loadtests.bench_gpu out", "date": "2027-01-02", "device_name": "H200",
                        "torch": "2.11", "shape": "7b", "layers": 8, "adapters": 8, "rank": 16,
                        "memory_measure": "torch.cuda.max_memory_allocated"},
               "adapter_load_ms": [4.0, 6.0], "runs": [run], "ratios": [{"batch": 64}], "skipped": []}
    (tmp_path / "gpu" / "bench").mkdir(parents=True)  # gpu_run.sh's bench.tgz, unpacked
    (tmp_path / "gpu" / "bench" / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    section = report.gpu_section()
    assert "`python -m loadtests.bench_gpu out` (`loadtests/results/gpu/bench/`), 2027-01-02, H200" in section
    assert "| 64 | mixed8 | 16.00 | 4000 | 3000 | 9.50 |" in section and "median 5.0 ms" in section


def test_splice_replaces_only_between_the_markers():
    readme = f"intro\n{report.BEGIN}\nold\n{report.END}\nafter\n"
    assert report.splice(readme, "new\n") == f"intro\n{report.BEGIN}\nnew\n{report.END}\nafter\n"
