"""A bounded schemathesis run against the real server: no 5xx, no response outside the OpenAPI
document, invalid data always refused with 4xx, the server alive and its registry intact after.

Every operation is fuzzed (positive and negative data, fixed seed) through the CLI, with the
generated model names steered to ones that exist (tests/fuzz_hooks.py) so requests reach
routing, sampling and streaming. Generation is capped at a few tokens to keep the run short.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.harness import ServerProcess
from tests.support import BASE

pytestmark = pytest.mark.integration

ADMIN_KEY = "fuzz-admin"
# every check but positive_data_acceptance: the schema cannot say which model names exist or how long a
# prompt may be, so a schema-valid request may rightly be refused (404, 400 over the context window)
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,negative_data_rejection,missing_required_header,unsupported_method,"
          "allow_header_conformance,use_after_free,ensure_resource_availability,ignored_auth")
SEED = 20261129


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, smollm_adapters, cache_dir):
    workdir = tmp_path_factory.mktemp("fuzz")
    roots = workdir / "roots"
    shutil.copytree(smollm_adapters["alpha"], roots / "alpha")
    settings = {
        "compute_dtype": "float32", "max_batch_size": 8, "context_window": 256, "default_max_tokens": 4,
        "max_tokens_limit": 6, "max_queued_requests": 32, "adapter_roots": [str(roots)],
        "adapters": {"alpha": {"path": str(smollm_adapters["alpha"]), "description": "Writes Python code.",
                               "examples": ["Write a Python function."]}},
    }
    server = ServerProcess(workdir, settings, env={"LORAPLEX_CACHE": cache_dir, "LORAPLEX_ADMIN_KEY": ADMIN_KEY}).start()
    yield server, workdir
    server.stop()


def test_fuzzing_every_operation_finds_no_server_error_and_no_schema_violation(fuzz_server):
    server, workdir = fuzz_server
    report = workdir / "fuzz.ndjson"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "LORAPLEX_FUZZ_MODELS": f"{BASE},alpha,auto",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", server.base_url + "/openapi.json",
               "--checks", CHECKS, "--mode", "all", "--max-examples", "100", "--seed", str(SEED), "--workers", "1",
               "--header", f"Authorization: Bearer {ADMIN_KEY}", "--request-timeout", "60", "--no-color",
               "--report", "ndjson", "--report-ndjson-path", str(report)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]

    # it reached the engine: completions answered 200 (not only 400/404), for several models
    statuses = _statuses(report)
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert statuses.get(("POST", path, 200), 0) >= 5, statuses
        assert statuses.get(("POST", path, 400), 0) >= 5, statuses
    # and it is still up, with nothing half-registered left behind
    assert server.proc.poll() is None, server.log()
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    listed = {a["id"] for a in httpx.get(server.base_url + "/v1/adapters", headers=admin, timeout=10).json()["data"]}
    data_dir = Path(server._env["LORAPLEX_DATA_DIR"])
    manifest = json.loads((data_dir / "manifest.json").read_text())["adapters"] if (data_dir / "manifest.json").exists() else {}
    assert listed == set(manifest) | {"alpha"}
    stored = {p.name for p in (data_dir / "store").iterdir()}
    assert stored == {Path(entry["folder"]).name for entry in manifest.values()}  # no staging or orphan folders
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def _statuses(report: Path) -> dict[tuple[str, str, int], int]:
    counts: dict[tuple[str, str, int], int] = {}
    for line in report.read_text().splitlines():
        for method, path, status in _responses(json.loads(line)):
            counts[(method, path, status)] = counts.get((method, path, status), 0) + 1
    return counts


def _responses(event):
    """(method, path template, status) of each interaction an ndjson event records, at any depth."""
    stack = [event]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            request, response = item.get("request"), item.get("response")
            if isinstance(request, dict) and isinstance(response, dict) and "status_code" in response:
                path = httpx.URL(request.get("uri", "")).path
                yield request.get("method"), path, response["status_code"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


if __name__ == "__main__":  # print the status counts of a saved report: python -m tests.test_fuzz REPORT
    for key, count in sorted(_statuses(Path(sys.argv[1])).items()):
        print(*key, count)
