"""packaging/grafana/devtrust-fleet.json: a Grafana dashboard that imports (valid JSON, schema
39, a DS_PROMETHEUS input every query uses), has the seed's panels, and queries only metrics
the verifier exports: the names are read from the verifier's own registry, not a copy."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from devtrust.verifier.metrics import VerifierMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "packaging" / "grafana" / "devtrust-fleet.json"
# The seed's panels (issue 13, item 3), and the verifier's own.
PANELS = {
    "Compliance rate per zone",
    "Security posture score",
    "Mean time to detection",
    "Detections over time",
    "Findings over time (prevalence)",
    "Appraisal latency",
    "Open attestation streams",
    "Certificates issued and revoked",
    "Enrollments",
}
_METRIC = re.compile(r"\bdevtrust_[a-z0-9_]+")


def load() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def exported() -> set[str]:
    """Every sample name the verifier's registry exposes (counters' _total, histograms'
    _bucket, _sum and _count included)."""
    registry = CollectorRegistry()
    metrics = VerifierMetrics(registry)
    # One child of each labelled metric, so that their samples exist.
    metrics.devices.labels("z", "enrolled", "affirming").set(1)
    metrics.devices_compliant.labels("z").set(1)
    metrics.appraisals.labels("z", "affirming").inc()
    metrics.findings.labels("tpm.quote.nonce_mismatch").inc()
    return {sample.name for family in registry.collect() for sample in family.samples}


def queries(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_the_dashboard_imports_into_grafana() -> None:
    doc = load()
    assert doc["schemaVersion"] == 39
    assert doc["uid"] == "devtrust-fleet"
    [source] = doc["__inputs"]
    assert source["name"] == "DS_PROMETHEUS"
    assert source["pluginId"] == "prometheus"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_the_seeds_panels_are_there() -> None:
    titles = {p["title"] for p in load()["panels"]}
    assert titles >= PANELS


def test_every_metric_queried_is_one_the_verifier_exports() -> None:
    names = exported()
    used = {name for expr in queries(load()) for name in _METRIC.findall(expr)}
    assert used, "no devtrust metric queried"
    assert used <= names, sorted(used - names)
    # Every verifier metric has a panel.
    families = {
        n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for n in names
    }
    shown = {
        n.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for n in used
    }
    assert families <= shown, sorted(families - shown)


def test_the_queries_are_balanced() -> None:
    """A PromQL expression with unbalanced brackets or quotes fails in Grafana only."""
    for expr in queries(load()):
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), expr
        assert expr.count('"') % 2 == 0, expr


def panel(title: str) -> dict[str, Any]:
    [found] = [p for p in load()["panels"] if p["title"] == title]
    assert isinstance(found, dict)
    return found


def test_compliance_applies_each_zones_minimum() -> None:
    """Compliance is the report's: devices meeting their zone's minimum tier (a warning device
    in a zone of minimum warning counts), not affirming devices (review 13a, M5)."""
    [target] = panel("Compliance rate per zone")["targets"]
    numerator, denominator = target["expr"].split(" / ")
    assert "devtrust_devices_compliant" in numerator
    assert "tier=" not in target["expr"]
    assert 'devtrust_devices{state="enrolled"' in denominator
    assert "zone's minimum" in panel("Compliance rate per zone")["description"]


def test_detections_are_the_changed_verdicts_and_findings_are_prevalence() -> None:
    """Detections count the detection histogram's observations (changed verdicts); the
    findings panel says it shows prevalence (review 13a, L4, M1)."""
    [detections] = panel("Detections over time")["targets"]
    assert "devtrust_detection_seconds_count" in detections["expr"]
    assert "devtrust_findings" not in detections["expr"]
    assert "prevalence" in panel("Findings over time (prevalence)")["description"]
    for title in ("Mean time to detection", "Mean time to detection over time"):
        description = panel(title)["description"]
        assert "changed its result" in description, title
        assert "not counted" in description, title
