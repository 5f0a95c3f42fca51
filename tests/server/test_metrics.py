"""/metrics: parses with prometheus-client's text parser, passes ``promtool check metrics``,
and has every metric the server documents, each with HELP and TYPE."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e3rl.server.metrics import METRIC_NAMES

# name -> Prometheus type, for every documented metric (histograms and counters by family).
EXPECTED_TYPES = {
    "e3rl_requests": "counter", "e3rl_request_errors": "counter",
    "e3rl_prompt_tokens": "counter", "e3rl_generation_tokens": "counter",
    "e3rl_time_to_first_token_seconds": "histogram",
    "e3rl_inter_token_latency_seconds": "histogram",
    "e3rl_e2e_request_latency_seconds": "histogram",
    "e3rl_request_queue_time_seconds": "histogram",
    "e3rl_requests_running": "gauge", "e3rl_requests_waiting": "gauge",
    "e3rl_kv_cache_usage_ratio": "gauge", "e3rl_kv_cache_blocks": "gauge",
    "e3rl_kv_cache_free_blocks": "gauge", "e3rl_preemptions": "counter",
    "e3rl_weights_version": "gauge", "e3rl_engine_alive": "gauge",
    "e3rl_erasures": "counter", "e3rl_erased_tokens": "counter", "e3rl_segments": "counter",
    "e3rl_draining": "gauge",
}


@pytest.fixture(scope="module")
def exposition(live) -> str:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        for stream in (False, True):
            r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5,
                                                     "n": 2, "stream": stream,
                                                     "ignore_eos": True})
            assert r.status_code == 200
        assert client.post("/v1/completions", json={"prompt": ""}).status_code == 400
        r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def test_every_metric_is_present_with_help_and_type(exposition):
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    for name, type_ in EXPECTED_TYPES.items():
        assert name in families, name
        assert families[name].type == type_, name
        assert families[name].documentation, name
        exposed = f"{name}_total" if type_ == "counter" else name
        assert f"# HELP {exposed} " in exposition, exposed
        assert f"# TYPE {exposed} {type_}" in exposition, exposed
    for name in METRIC_NAMES:
        assert any(line.startswith(name) for line in exposition.splitlines()), name


def test_values_reflect_the_traffic(exposition):
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(exposition) for s in f.samples}
    model = ("model", "tiny")
    assert samples[("e3rl_requests_total", (("finish_reason", "length"), model))] >= 4
    assert samples[("e3rl_request_errors_total", (model, ("status", "400")))] >= 1
    assert samples[("e3rl_generation_tokens_total", (model,))] >= 20
    assert samples[("e3rl_time_to_first_token_seconds_count", (model,))] >= 2
    assert samples[("e3rl_inter_token_latency_seconds_count", (model,))] >= 16
    assert samples[("e3rl_weights_version", (model, ("version", "0")))] == 0
    assert samples[("e3rl_engine_alive", (model,))] == 1
    assert samples[("e3rl_draining", (model,))] == 0
    assert samples[("e3rl_erasures_total", (model,))] == 0  # healing is off


def test_promtool_check_metrics(exposition):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; .ci/run "
                    "installs it)")
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
