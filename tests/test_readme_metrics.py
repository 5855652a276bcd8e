"""README's metrics table against what the real server serves at /metrics: every name, type, label
set and histogram range in the table is served, and every served metric is in the table."""
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import REPO
from server.metrics import Metrics

pytestmark = pytest.mark.integration


def readme_table() -> dict[str, dict]:
    """metric name -> {"type", "labels", "range"} from the README's Metrics table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Metrics"):text.index("## Performance")]
    rows = [line for line in section.splitlines() if line.startswith("| `loraplex_")]
    table = {}
    for row in rows:
        names_cell, type_cell, labels_cell = [cell.strip() for cell in row.strip("|").split("|")]
        names = re.findall(r"`(loraplex_[a-z0-9_]+)`", names_cell)
        kinds = [kind.strip() for kind in re.sub(r"\(.*?\)", "", type_cell).split(",")]
        kinds = kinds if len(kinds) == len(names) else kinds * len(names)
        span = re.search(r"\((\S+ m?s) to (\S+ m?s)\)", type_cell)
        labels = set(re.findall(r"`([a-z_]+)`", re.sub(r"\(.*?\)", "", labels_cell)))
        for name, kind in zip(names, kinds):
            table[name] = {"type": kind, "labels": labels, "range": span.groups() if span else None}
    return table


def _seconds(text: str) -> float:
    number, unit = text.split()
    return float(number) / (1000 if unit == "ms" else 1)


def served(server) -> dict[str, dict]:
    """name -> {"type", "labels", "range"} from /metrics, label names of unlabelled-so-far metrics from the code."""
    declared = {m._name: m for m in vars(Metrics()).values() if hasattr(m, "_labelnames")}
    out = {}
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics", timeout=30).text):
        if not family.name.startswith("loraplex_") or family.name.endswith("_created"):
            continue  # _created: the creation timestamp prometheus_client adds to each counter and histogram
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        code = declared.get(family.name)
        if code is not None:
            labels |= set(code._labelnames)
        span = None
        if family.type == "histogram":
            bounds = [b for b in code._upper_bounds if b != float("inf")]
            span = (bounds[0], bounds[-1])
        out[name] = {"type": family.type, "labels": labels, "range": span}
    return out


def test_readme_metrics_table_matches_the_served_metrics(server):
    documented, actual = readme_table(), served(server)
    assert set(documented) == set(actual), (set(documented) - set(actual), set(actual) - set(documented))
    for name, doc in documented.items():
        assert doc["type"] == actual[name]["type"], name
        assert doc["labels"] == actual[name]["labels"], name
        if doc["range"] is not None:
            assert tuple(map(_seconds, doc["range"])) == actual[name]["range"], name
