"""deploy/monitoring/grafana-dashboard.json charts only series the server really exports: every
deltamem_* name in its queries is looked up in a live server's GET /metrics, so a renamed or misspelt
metric, or a counter without `_total` or a histogram without `_bucket`, fails here instead of
drawing an empty panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ThreadServer, chat, make_settings

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "grafana-dashboard.json"
METRIC = re.compile(r"deltamem_[a-z_]+")
DATASOURCE_UID = "${datasource}"   # the dashboard's own variable: it imports into any Grafana


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def query_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel that draws something; rows only group (a collapsed row holds its panels)."""
    for panel in panels:
        if panel.get("type") == "row":
            yield from query_panels(panel.get("panels", []))
        else:
            yield panel


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [(f"panel {p.get('title')!r}", t.get("expr", "")) for p in query_panels(dashboard["panels"])
             for t in p.get("targets", [])]
    found += [(f"variable ${v['name']}", v["query"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def used_metrics(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Metric name -> where the dashboard uses it."""
    used: dict[str, list[str]] = {}
    for where, expr in queries(dashboard):
        for name in METRIC.findall(expr):
            used.setdefault(name, []).append(where)
    return used


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory) -> Iterator[ThreadServer]:
    """The torch engine only: both engines report through the same metrics code."""
    srv = ThreadServer(make_settings(tiny_paths, tmp_path_factory.mktemp("state"), engine="torch")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def exposition(server) -> dict[str, set[str]]:
    """Family name -> its sample names (_total, _bucket, _sum, _count; the text format's `x_created`
    timestamps parse as families of their own), from a real scrape after one session turn, so that
    labelled histograms and the store's series have samples."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        chat(http, [{"role": "user", "content": "hello"}], "dashboard-check", max_tokens=3)
        r = http.get("/metrics")
    assert r.status_code == 200
    return {f.name: {s.name for s in f.samples} for f in text_string_to_metric_families(r.text)
            if f.name.startswith("deltamem_")}


def test_dashboard_is_a_grafana_dashboard() -> None:
    d = load_dashboard()
    assert d["title"] == "delta-mem-vllm" and d["uid"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(query_panels(d["panels"]))
    assert panels, "no panels"
    ids = [p["id"] for p in d["panels"]] + [p["id"] for p in panels if p not in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: target {t.get('refId')} has no expr"
            assert t.get("datasource", {"uid": DATASOURCE_UID})["uid"] == DATASOURCE_UID, p["title"]


def test_every_query_names_a_deltamem_metric() -> None:
    for where, expr in queries(load_dashboard()):
        assert METRIC.search(expr), f"{where}: {expr!r} names no deltamem_* metric"


def test_every_metric_the_dashboard_uses_is_exported(exposition: dict[str, set[str]]) -> None:
    # Prometheus stores samples, not families: a counter family `x` is the series `x_total`
    samples = set().union(*exposition.values())
    missing = []
    for name, where in sorted(used_metrics(load_dashboard()).items()):
        if name in samples:
            continue
        hint = f" (a family; the series are {sorted(exposition[name])})" if name in exposition else ""
        missing.append(f"{name}{hint}, used by {', '.join(sorted(set(where)))}")
    assert not missing, "not in GET /metrics:\n" + "\n".join(missing)


def test_every_exported_metric_is_charted(exposition: dict[str, set[str]]) -> None:
    used = set(used_metrics(load_dashboard()))
    uncharted = sorted(family for family, samples in exposition.items()
                       if not samples & used and not family.endswith("_created"))   # creation timestamps
    assert not uncharted, f"exported but on no panel of {DASHBOARD.name}: {uncharted}"
