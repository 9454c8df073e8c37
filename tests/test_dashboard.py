"""The Grafana dashboard asks only for metrics (and labels) the daemon exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from conftest import REPO
from edgeproxy.metrics import BY_NAME, METRICS, exported_series

DASHBOARD = REPO / "dashboards" / "edgeproxy.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus, not by the daemon
METRIC_TOKEN = re.compile(r"\bedgeproxy_\w+")
SELECTOR = re.compile(r"\b(edgeproxy_\w+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["definition"])
    return out


def foreign_names(expr: str) -> set[str]:
    """Identifiers in metric position that are not ours: strip strings, label
    matchers, grouping lists and ranges, then drop functions and keywords."""
    text = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr.strip())  # Grafana's
    text = re.sub(r'"[^"]*"', '""', text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\$\w+", "", text)
    names = set(re.findall(r"\b([A-Za-z_]\w*)\b(?!\s*\()", text))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("edgeproxy_")}


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_every_query_names_only_exported_metrics() -> None:
    exported = exported_series()
    found = queries(load())
    assert len(found) > 20
    for expr in found:
        names = set(METRIC_TOKEN.findall(expr))
        assert names, f"query names no edgeproxy metric: {expr}"
        assert names <= exported, f"{sorted(names - exported)} not exported: {expr}"
        assert not foreign_names(expr), f"foreign names {foreign_names(expr)} in: {expr}"


def test_label_matchers_use_labels_the_metric_has() -> None:
    for expr in queries(load()):
        for metric, matchers in SELECTOR.findall(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", metric) \
                if metric not in BY_NAME else metric
            labels = set(BY_NAME[base].labels) | SCRAPE_LABELS
            if metric.endswith("_bucket"):
                labels.add("le")
            used = set(MATCHER_LABEL.findall(matchers)) - {"__name__"}
            assert used <= labels, f"{metric}: {sorted(used - labels)} in {expr}"


def test_dashboard_has_per_app_rows_and_covers_the_app_series() -> None:
    dashboard = load()
    repeated = [p for p in dashboard["panels"] if p["type"] == "row" and p.get("repeat")]
    assert {p["repeat"] for p in repeated} == {"app"}
    used = {n for q in queries(dashboard) for n in METRIC_TOKEN.findall(q)}
    app_series = {s for m in METRICS if "app" in m.labels for s in m.series}
    missing = sorted(app_series - used - {"edgeproxy_app_tcp_no_backend_total",
                                          "edgeproxy_app_tcp_resteered_total"})
    assert not missing, f"per-app series with no panel: {missing}"


def test_the_checker_catches_a_bad_query() -> None:
    assert foreign_names('sum(rate(node_cpu_seconds_total{mode="idle"}[5m]))') == \
        {"node_cpu_seconds_total"}
    assert not foreign_names(
        'histogram_quantile(0.9, sum by (le) (rate(edgeproxy_x_bucket{app=~"$app"}[5m])))')
    assert not METRIC_TOKEN.findall("up") and "edgeproxy_nope_total" not in exported_series()
