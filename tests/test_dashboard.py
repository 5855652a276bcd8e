"""The Grafana dashboard only plots metrics the server exports."""
import json
import re
from pathlib import Path

from server.metrics import Metrics


def test_dashboard_queries_name_exported_metrics():
    metrics = Metrics()
    metrics.watch(running=lambda: 0, waiting=lambda: 0, tiers=lambda: {}, kv_blocks=lambda: (0, 0), kv_block_bytes=lambda: 0)
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "configs" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"loraplex_[a-z0-9_]+", target["expr"])}
    assert len(queried) >= 12
    # labelled families have no samples until used: compare those on the family name
    families = {family.name for family in metrics.registry.collect()}
    for name in queried:
        base = re.sub(r"_(bucket|count|sum|total)$", "", name)
        assert name in exported or base in families, name
