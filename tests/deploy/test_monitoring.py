"""The chart's monitoring: the Prometheus rules (``promtool check rules`` and the unit tests
in deploy/prometheus/), every metric name the rules and the Grafana dashboard use against a
live ``e3rl serve`` and the trainer's ``/metrics``, and the ServiceMonitors, PrometheusRule
and dashboard ConfigMap that ``helm template`` renders (its rules equal to the tested file)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.chart import NAMESPACE, RELEASE, helm, one, render, render_error, sets
from tests.server.conftest import start_serve_process

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "e3rl"
RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "e3rl-dashboard.json"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules-test.yaml"
# Metric names the rules and the dashboard may use that e3rl does not expose.
EXTERNAL = {
    "up": "Prometheus' own per-target scrape health",
    "kube_pod_status_ready": "kube-state-metrics (E3rlReplicaNotReady)",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "offset", "bool", "inf", "nan", "atan2"}
MONITORING_ON = ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
                 "--set", "grafanaDashboard.enabled=true"]
FULL, HEADLESS, TRAINER = f"{RELEASE}-e3rl", f"{RELEASE}-e3rl-headless", f"{RELEASE}-e3rl-trainer"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return path


def rules_file() -> dict:
    return yaml.safe_load(RULES.read_text())


def all_rules() -> list[dict]:
    return [rule for group in rules_file()["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


# -- PromQL names ------------------------------------------------------------------------
def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression selects: identifiers that
    are not functions, keywords, label names, strings, durations or numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"'(?:[^'\\]|\\.)*'", "''", expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges, subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[m.end():].lstrip().startswith("("):  # a function or aggregation
            continue
        if m.group(0).lower() not in PROMQL_KEYWORDS:
            names.add(m.group(0))
    return names


def test_metric_names_parser():
    assert metric_names('sum by (pod, le) (rate(e3rl_x_bucket{a="b:c", d=~"e_f"}[5m])) '
                        '/ on (pod) group_left (model) e3rl:y:rate5m offset 15m > 0.95') == {
        "e3rl_x_bucket", "e3rl:y:rate5m"}
    assert metric_names('time() - min_over_time((g > 0)[3h:1m]) and up{job="e3rl"} == 0 '
                        "unless max without (server) (h) > 2 * 1e-3") == {"g", "up", "h"}


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in all_rules()]


def dashboard_exprs() -> list[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    dash = dashboard()
    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            exprs.append(m.group(1) if m else query)
    return exprs


def used_names() -> dict[str, set[str]]:
    """Every name the rules and the dashboard select, by where it is used."""
    used: dict[str, set[str]] = {}
    for where, exprs in (("rules", rule_exprs()), ("dashboard", dashboard_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(where)
    return used


# -- promtool --------------------------------------------------------------------------------
def test_promtool_check_and_unit_tests_pass():
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # The unit tests load the shipped file itself (the one the chart embeds).
    spec = yaml.safe_load(RULES_TEST.read_text())
    assert [(RULES_TEST.parent / f).resolve() for f in spec["rule_files"]] == [RULES.resolve()]
    test = subprocess.run([tool, "test", "rules", str(RULES_TEST)], capture_output=True,
                          text=True, timeout=120, cwd=RULES_TEST.parent)
    assert test.returncode == 0, test.stdout + test.stderr


def test_every_alert_fires_and_stays_silent_and_every_recording_rule_is_checked():
    spec = yaml.safe_load(RULES_TEST.read_text())
    fires, silent, checked = set(), set(), set()
    for case in spec["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
        for t in case.get("promql_expr_test", []):
            for sample in t.get("exp_samples") or []:
                checked.add(sample["labels"].split("{")[0])
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    records = {r["record"] for r in all_rules() if "record" in r}
    assert alerts - fires == set(), "alerts without a case where they fire"
    assert alerts - silent == set(), "alerts without a case where they stay silent"
    assert records - checked == set(), "recording rules whose value no test checks"
    for rule in all_rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), \
                rule["alert"]


def test_recorded_names_used_are_recorded_and_rates_take_counters():
    records = {r["record"] for r in all_rules() if "record" in r}
    for name, where in used_names().items():
        if ":" in name:
            assert name in records, f"{name} (used by the {where}) is no recording rule"
    # rate()/increase() only over counters and histogram series.
    for expr in rule_exprs() + dashboard_exprs():
        for m in re.finditer(r"\b(?:rate|irate|increase)\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", expr):
            assert re.search(r"(_total|_bucket|_count|_sum)$", m.group(1)), (m.group(1), expr)


# -- every name exists -------------------------------------------------------------------
def scraped_names(text: str) -> set[str]:
    """Sample names as Prometheus stores them (``_total``, ``_bucket``, ``_sum``, ...)."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def server_metrics(tiny_model, tmp_path_factory) -> str:
    """/metrics of a live ``e3rl serve`` with healing, a store and an admin key, after one
    healed completion and one refused request (so the labelled error series exists)."""
    tmp = tmp_path_factory.mktemp("monitoring")
    proc, url = start_serve_process(
        ["--model", str(tiny_model), "--healing", '{"enabled": true}',
         "--admin-key", "admin-key-for-tests", "--data-dir", str(tmp / "data"),
         "--num-threads", "1", "--kv-cache-memory-gb", "0.05", "--log-level", "warning",
         "--no-access-log"], timeout_s=300)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 8,
                                                     "temperature": 1.0, "seed": 1})
            assert r.status_code == 200, r.text
            assert client.post("/v1/completions", json={"prompt": "ab", "max_tokens": -1}
                               ).status_code == 400
            r = client.get("/metrics")
            assert r.status_code == 200
            return r.text
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def trainer_metrics() -> str:
    """The trainer's /metrics, served by its HealthServer, with one child of every labelled
    metric (they appear at their first event, as in a running trainer)."""
    from e3rl.trainer.follow_metrics import HealthServer, TrainerMetrics

    metrics = TrainerMetrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    server = HealthServer(metrics, "127.0.0.1", 0, stall_timeout_s=300)
    server.start()
    try:
        r = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        assert r.status_code == 200
        return r.text
    finally:
        server.close()


def test_every_metric_name_used_exists(server_metrics, trainer_metrics):
    served = scraped_names(server_metrics)
    trainer = scraped_names(trainer_metrics)
    assert "e3rl_erasures_total" in served and "e3rl_trainer_steps" in trainer
    missing, unknown = {}, {}
    for name, where in sorted(used_names().items()):
        if ":" in name or name in EXTERNAL:
            continue
        if name.startswith("e3rl_trainer_"):
            if name not in trainer:
                missing[name] = where
        elif name.startswith("e3rl_"):
            if name not in served:
                missing[name] = where
        else:
            unknown[name] = where
    assert not missing, f"used but not exposed: {missing}"
    assert not unknown, f"neither e3rl's nor listed in EXTERNAL: {unknown}"


# -- the rendered chart --------------------------------------------------------------------
def scraped_services(monitor: dict, services: list[dict]) -> dict[str, list[str]]:
    """For each endpoint of a ServiceMonitor: the rendered Services it scrapes (label
    selector, then a ``keep`` relabelling on the Service name), each once per named port."""
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    out = {}
    for endpoint in monitor["spec"]["endpoints"]:
        names = []
        for svc in services:
            if not selector.items() <= svc["metadata"]["labels"].items():
                continue
            name = svc["metadata"]["name"]
            if any(r.get("action") == "keep" and r["sourceLabels"] ==
                   ["__meta_kubernetes_service_name"] and not re.fullmatch(r["regex"], name)
                   for r in endpoint.get("relabelings", [])):
                continue
            if endpoint["port"] in [p["name"] for p in svc["spec"]["ports"]]:
                names.append(name)
        out[endpoint["port"]] = names
    return out


def job_of(endpoint: dict) -> str:
    [job] = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    return job


def test_monitoring_is_off_by_default():
    objects = render(*sets(**{"trainer.enabled": True}))
    assert not [o for o in objects if o["kind"] in ("ServiceMonitor", "PrometheusRule")]
    assert not [o for o in objects if o["kind"] == "ConfigMap"]


def test_service_monitors_scrape_each_replica_once_and_the_trainer():
    objects = render(*MONITORING_ON, *sets(**{"trainer.enabled": True, "replicaCount": 3,
                                              "serviceMonitor.interval": "15s",
                                              "serviceMonitor.labels": {"release": "kps"}}))
    services = [o for o in objects if o["kind"] == "Service"]
    server = one(objects, "ServiceMonitor", FULL)
    # Both Services select the replicas; only the headless one is scraped (once per pod).
    assert scraped_services(server, services) == {"http": [HEADLESS]}
    [endpoint] = server["spec"]["endpoints"]
    assert (endpoint["path"], endpoint["interval"], job_of(endpoint)) == ("/metrics", "15s",
                                                                          "e3rl")
    assert "authorization" not in endpoint
    # The port is the container's API port (where /metrics is).
    sts = one(objects, "StatefulSet")
    svc = one(objects, "Service", HEADLESS)
    port = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
    ports = {p["name"]: p["containerPort"] for c in sts["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    assert ports[port["targetPort"]] == 8000
    trainer = one(objects, "ServiceMonitor", TRAINER)
    assert scraped_services(trainer, services) == {"metrics": [TRAINER]}
    assert job_of(trainer["spec"]["endpoints"][0]) == "e3rl-trainer"
    for monitor in (server, trainer):
        assert monitor["metadata"]["labels"]["release"] == "kps"


def test_sidecar_trainer_is_a_second_endpoint():
    objects = render(*MONITORING_ON, *sets(**{"trainer.enabled": True,
                                              "trainer.mode": "sidecar"}))
    services = [o for o in objects if o["kind"] == "Service"]
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceMonitor"] == [FULL]
    monitor = one(objects, "ServiceMonitor", FULL)
    assert scraped_services(monitor, services) == {"http": [HEADLESS],
                                                   "trainer-metrics": [HEADLESS]}
    assert [job_of(e) for e in monitor["spec"]["endpoints"]] == ["e3rl", "e3rl-trainer"]


def test_metrics_behind_the_api_key_are_scraped_with_it():
    objects = render(*MONITORING_ON, *sets(**{"server.args.metrics-require-auth": True,
                                              "auth.apiKey": "api-key-for-tests"}))
    [endpoint] = one(objects, "ServiceMonitor", FULL)["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {
        "name": f"{FULL}-auth", "key": "api-key"}}
    assert "api-key" in one(objects, "Secret")["data"]


def test_prometheus_rule_is_the_tested_file():
    rule = one(render(*MONITORING_ON), "PrometheusRule", FULL)
    assert rule["spec"]["groups"] == rules_file()["groups"]
    assert rule["metadata"]["namespace"] == NAMESPACE


def test_alert_overrides_from_values():
    rule = one(render(*MONITORING_ON, *sets(**{
        "prometheusRule.alerts.E3rlQueueBacklog": {"for": "30m", "severity": "critical"},
        "prometheusRule.alerts.E3rlTrainerDown.enabled": False,
        "prometheusRule.labels": {"release": "kps"}})), "PrometheusRule")
    rendered = {r.get("alert") or r["record"] + str(r.get("labels")): r
                for g in rule["spec"]["groups"] for r in g["rules"]}
    shipped = {r.get("alert") or r["record"] + str(r.get("labels")): r for r in all_rules()}
    assert set(shipped) - set(rendered) == {"E3rlTrainerDown"}
    backlog = rendered.pop("E3rlQueueBacklog")
    assert (backlog["for"], backlog["labels"]["severity"]) == ("30m", "critical")
    assert backlog["expr"] == shipped["E3rlQueueBacklog"]["expr"]
    assert all(r == shipped[k] for k, r in rendered.items())
    assert rule["metadata"]["labels"]["release"] == "kps"
    error = render_error(*MONITORING_ON, *sets(**{"prometheusRule.alerts.E3rlNoSuch.for": "1m"}))
    assert "prometheusRule.alerts.E3rlNoSuch" in error, error


def test_values_list_every_alert_with_the_files_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["alerts"]
    shipped = {r["alert"]: r for r in all_rules() if "alert" in r}
    assert list(values) == list(shipped)
    for name, v in values.items():
        assert (v["for"], v["severity"]) == (shipped[name]["for"],
                                             shipped[name]["labels"]["severity"]), name


def test_dashboard_configmap():
    objects = render(*MONITORING_ON)
    cm = one(objects, "ConfigMap", f"{FULL}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["e3rl.json"]) == dashboard()
    # Labels of one's own are added to the default (null drops it).
    cm = one(render(*MONITORING_ON, *sets(**{"grafanaDashboard.labels": {
        "grafana_dashboard": None, "dashboards": "e3rl"}})), "ConfigMap")
    assert cm["metadata"]["labels"]["dashboards"] == "e3rl"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]


def test_dashboard_panels():
    dash = dashboard()
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles))
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "namespace",
                                                                 "service", "trainer"]
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["description"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert 'namespace="$namespace"' in target["expr"], target["expr"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_helm_lint_strict_with_monitoring():
    for extra in ([], sets(**{"trainer.enabled": True}),
                  sets(**{"trainer.enabled": True, "trainer.mode": "sidecar"})):
        done = subprocess.run([helm(), "lint", "--strict", str(CHART), *MONITORING_ON, *extra],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
