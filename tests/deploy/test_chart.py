"""The Helm chart (deploy/helm/e3rl): ``helm lint --strict``; every example value set renders
and each built-in object passes ``kubernetes-validate --strict`` for three Kubernetes minor
versions (the KEDA ScaledObject, a CRD, is checked by structure); bad values fail with the
value named; and what matters in the rendered objects: security contexts, no service-account
token, probes, the trainer's DNS name of the replicas, keys from the Secret, volumes,
NetworkPolicy ports, autoscaling. The chart's flag maps (``server.args``, ``trainer.args``)
are checked against ``e3rl serve``'s and ``e3rl train follow``'s own parsers."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import (CHART, NAMESPACE, RELEASE, container, flag, helm, kinds, one,
                                pod_specs, render, render_error, sets, value_sets)

FULL, HEADLESS, TRAINER = f"{RELEASE}-e3rl", f"{RELEASE}-e3rl-headless", f"{RELEASE}-e3rl-trainer"
# kubernetes-validate bundles schemas for 1.25-1.37; three supported minors a cluster runs.
KUBE_VERSIONS = ["1.29.0", "1.32.0", "1.35.0"]
CRD_GROUPS = ("keda.sh", "monitoring.coreos.com")
SERVER_OWNED = {"model", "host", "port", "admin-port", "data-dir", "checkpoint-dir",
                "drain-timeout-s", "api-key", "admin-key", "device"}
TRAINER_OWNED = {"servers", "servers_file", "servers_dns", "model", "state_dir", "metrics_host",
                 "metrics_port", "device", "max_updates"}


def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def test_helm_lint_strict():
    for args in value_sets().values():
        done = subprocess.run([helm(), "lint", "--strict", str(CHART), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_value_sets_cover_what_the_chart_offers():
    names = set(value_sets())
    assert {"default", "gpu", "sidecar-trainer", "trainer-deployment", "hpa", "keda",
            "existing-secret", "model-pvc"} <= names
    assert yaml.safe_load((CHART / "ci" / "trainer-deployment-values.yaml").read_text())[
        "replicaCount"] == 3


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(*args) for name, args in value_sets().items()}


def is_crd(obj: dict) -> bool:
    return obj["apiVersion"].split("/")[0].endswith(CRD_GROUPS)


def test_every_builtin_object_validates_strictly(rendered, tmp_path):
    files = []
    for name, objects in rendered.items():
        builtin = [o for o in objects if not is_crd(o)]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        files.append(str(path))
    tool = Path(sys.executable).parent / "kubernetes-validate"
    if not tool.exists():
        pytest.fail("kubernetes-validate is not installed (the test extra has it)")
    versions = [arg for v in KUBE_VERSIONS for arg in ("-k", v)]
    done = subprocess.run([str(tool), "--strict", *versions, *files], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # It said so for every object and version (nothing skipped for want of a schema).
    lines = [ln for ln in done.stdout.splitlines() if " passed for resource " in ln]
    expected = sum(len([o for o in objs if not is_crd(o)]) for objs in rendered.values())
    assert len(lines) == expected * len(KUBE_VERSIONS), done.stdout[-2000:]
    for version in KUBE_VERSIONS:
        minor = version.rsplit(".", 1)[0]
        assert sum(f"version {minor}" in ln for ln in lines) == expected


def test_the_value_sets_render_the_objects_they_ask_for(rendered):
    assert kinds(rendered["default"]) == sorted([
        "PodDisruptionBudget", "Secret", "Service", "Service", "ServiceAccount", "StatefulSet",
        "Pod"])
    assert "Deployment" not in kinds(rendered["sidecar-trainer"])
    assert kinds(rendered["trainer-deployment"]).count("NetworkPolicy") == 2
    assert {"Deployment", "PersistentVolumeClaim"} <= set(kinds(rendered["trainer-deployment"]))
    assert "HorizontalPodAutoscaler" in kinds(rendered["hpa"])
    assert "ScaledObject" in kinds(rendered["keda"])
    assert "HorizontalPodAutoscaler" not in kinds(rendered["keda"])  # KEDA makes its own
    assert "Secret" not in kinds(rendered["existing-secret"])
    assert "ServiceAccount" not in kinds(rendered["existing-secret"])


# -- bad values ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, named", [
    (sets(bogus=1), "bogus"),
    (sets(**{"server.args.max-num-seq": 8}), "max-num-seq"),
    (sets(replicaCount=-1), "replicaCount"),
    (sets(**{"trainer.mode": "daemonset"}), "trainer.mode"),
    (sets(**{"trainer.args.batch-size": 0}), "trainer.args.batch-size"),
    (sets(**{"trainer.enabled": True, "trainer.mode": "sidecar", "replicaCount": 3}),
     "replicaCount"),
    (sets(terminationGracePeriodSeconds=20), "terminationGracePeriodSeconds"),
    (sets(**{"server.drainTimeoutS": 120}), "server.drainTimeoutS"),
    (sets(**{"autoscaling.enabled": True, "trainer.enabled": True, "trainer.mode": "sidecar"}),
     "autoscaling.enabled"),
    (sets(**{"autoscaling.keda.enabled": True}), "autoscaling.enabled"),
    (sets(**{"auth.existingSecret.name": "keys"}), "auth.existingSecret.adminKeyKey"),
    (sets(**{"auth.apiKey": "same", "auth.adminKey": "same"}), "auth.adminKey"),
    (sets(**{"model.source": "pvc"}), "model.pvc.claimName"),
    (sets(**{"model.source": "s3"}), "model.source"),
    (sets(**{"server.adminPort": 8000}), "server.adminPort"),
    (sets(**{"image.digest": "latest"}), "image.digest"),
    (sets(**{"resources.limits.cpu": "four"}), "resources.limits.cpu"),
])
def test_bad_values_fail_naming_the_value(args, named):
    error = render_error(*args)
    assert named in error, error


# -- what matters in the objects ----------------------------------------------------------
def test_every_container_is_locked_down_and_no_pod_gets_a_token(rendered):
    for name, objects in rendered.items():
        sa = [o for o in objects if o["kind"] == "ServiceAccount"]
        assert all(o["automountServiceAccountToken"] is False for o in sa)
        for where, spec in pod_specs(objects):
            assert spec["automountServiceAccountToken"] is False, (name, where)
            assert spec["enableServiceLinks"] is False, (name, where)
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["runAsNonRoot"] is True, (name, where, c["name"])
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
                if name != "model-hostpath":  # that set leaves the user to the platform
                    assert sc["runAsUser"] == 10001 and pod["runAsUser"] == 10001
                # /tmp is writable (HOME and every cache are there), nothing else is needed.
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env["HOME"] == "/tmp"


def test_server_args_ports_and_probes():
    objects = render()
    server = container(objects, "StatefulSet", "server")
    args = server["args"]
    assert args[0] == "serve"
    assert flag(args, "--host") == "0.0.0.0" and flag(args, "--port") == "8000"
    assert flag(args, "--admin-port") == "8001" and flag(args, "--drain-timeout-s") == "30"
    assert flag(args, "--model") == "/opt/e3rl/models/arith-chain"
    assert flag(args, "--num-threads") == "3"  # 4 requested cores, one kept for HTTP
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "admin": 8001}
    assert server["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"][
        "failureThreshold"] >= 300
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert flag(args, "--data-dir") == mounts["data"]
    assert flag(args, "--checkpoint-dir") == mounts["checkpoints"]
    spec = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in spec["volumes"]}["checkpoints"] == {"name": "checkpoints",
                                                                       "emptyDir": {}}
    # preStop, then SIGTERM starts the drain: the grace period covers both and the flush.
    sleep = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] >= sleep + 30 + 10


def test_num_threads_follow_the_cpu_resources():
    objects = render(*sets(**{"resources": {"limits": {"cpu": "2500m", "memory": "1Gi"},
                                            "requests": {"cpu": 8}},
                              "trainer.enabled": True,
                              "trainer.resources": {"requests": {"cpu": "1500m"}}}))
    server = container(objects, "StatefulSet", "server")
    assert flag(server["args"], "--num-threads") == "1"  # the limit wins: 2 cores - 1
    assert {e["name"]: e.get("value") for e in server["env"]}["OMP_NUM_THREADS"] == "1"
    trainer = container(objects, "Deployment", "trainer")
    assert flag(trainer["args"], "--num-threads") == "1"
    given = render(*sets(**{"server.args.num-threads": 6}))
    assert flag(container(given, "StatefulSet", "server")["args"], "--num-threads") == "6"


def test_statefulset_volumes_and_headless_service(rendered):
    objects = rendered["default"]
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["serviceName"] == HEADLESS
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenScaled": "Retain",
                                                                    "whenDeleted": "Retain"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    headless = one(objects, "Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"http": 8000,
                                                                         "admin": 8001}
    client = one(objects, "Service", FULL)
    assert client["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in client["spec"]["ports"]] == [("http", 8000)]
    for svc in (headless, client):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    # Scaled-down replicas' stores can be deleted on request.
    pvc = render(*value_sets()["model-pvc"])
    assert one(pvc, "StatefulSet")["spec"]["persistentVolumeClaimRetentionPolicy"][
        "whenScaled"] == "Delete"


def secret_data(objects: list[dict], name: str) -> dict[str, str]:
    secret = one(objects, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def key_refs(c: dict) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in c["env"] if "valueFrom" in e}


def test_keys_come_from_the_secret(rendered):
    objects = rendered["trainer-deployment"]
    data = secret_data(objects, f"{FULL}-auth")
    assert list(data) == ["admin-key"] and len(data["admin-key"]) == 48  # generated
    for c in (container(objects, "StatefulSet", "server"), container(objects, "Deployment",
                                                                     "trainer")):
        assert key_refs(c)["E3RL_ADMIN_KEY"] == (f"{FULL}-auth", "admin-key")
        assert "--admin-key" not in c["args"] and "--api-key" not in c["args"]
    assert "E3RL_API_KEY" not in key_refs(container(objects, "StatefulSet", "server"))
    given = rendered["model-pvc"]
    assert secret_data(given, f"{FULL}-auth") == {"admin-key": "admin-key-4567",
                                                  "api-key": "client-key-0123"}
    refs = key_refs(container(given, "StatefulSet", "server"))
    assert refs["E3RL_API_KEY"] == (f"{FULL}-auth", "api-key")
    external = rendered["existing-secret"]
    refs = key_refs(container(external, "StatefulSet", "server"))
    assert refs == {"E3RL_ADMIN_KEY": ("e3rl-keys", "admin"), "E3RL_API_KEY": ("e3rl-keys", "api")}
    assert key_refs(container(external, "Pod", "test")) == {"E3RL_API_KEY": ("e3rl-keys", "api")}
    sts = one(external, "StatefulSet")["spec"]["template"]["spec"]
    assert sts["serviceAccountName"] == "e3rl-runner"
    assert "--metrics-require-auth" in container(external, "StatefulSet", "server")["args"]


def test_admin_key_is_kept_by_upgrades():
    """``lookup`` keeps the Secret's key when the release exists; ``helm template`` cannot
    look up, so this reads the template: a given key, else the stored one, else random."""
    text = (CHART / "templates" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in text
    assert text.index("lookup") < text.index("randAlphaNum")
    # Without a cluster every render draws a new key (two renders: two keys).
    one_key = secret_data(render(), f"{FULL}-auth")["admin-key"]
    assert one_key != secret_data(render(*sets(nameOverride="")), f"{FULL}-auth")["admin-key"]


def test_trainer_deployment_follows_the_headless_service(rendered):
    objects = rendered["trainer-deployment"]
    dep = one(objects, "Deployment", TRAINER)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    trainer = container(objects, "Deployment", "trainer")
    args = trainer["args"]
    assert args[:2] == ["train", "follow"]
    assert flag(args, "--servers-dns") == \
        f"{HEADLESS}.{NAMESPACE}.svc.cluster.local:8001"
    headless = one(objects, "Service", HEADLESS)
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]}["admin"] == 8001
    assert flag(args, "--model") == flag(container(objects, "StatefulSet", "server")["args"],
                                         "--model")
    assert flag(args, "--metrics-host") == "0.0.0.0" and flag(args, "--metrics-port") == "9100"
    assert flag(args, "--batch-size") == "16" and flag(args, "--lr") == "5e-06"
    assert flag(args, "--max-kl") == "0.02" and flag(args, "--gate-data") == \
        "arith-chain:validation"
    assert "--no-dry-run" in args and "--segment-weights" in args
    assert trainer["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert trainer["startupProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in trainer["ports"]} == {"metrics": 9100}
    mounts = {m["name"]: m["mountPath"] for m in trainer["volumeMounts"]}
    assert flag(args, "--state-dir") == mounts["trainer-state"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["trainer-state"]["persistentVolumeClaim"]["claimName"] == TRAINER
    pvc = one(objects, "PersistentVolumeClaim", TRAINER)
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    svc = one(objects, "Service", TRAINER)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_sidecar_trainer_follows_its_own_pod(rendered):
    objects = rendered["sidecar-trainer"]
    spec = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["server", "trainer"]
    trainer = container(objects, "StatefulSet", "trainer")
    assert flag(trainer["args"], "--server") == "http://127.0.0.1:8001"
    assert "--servers-dns" not in trainer["args"]
    assert flag(trainer["args"], "--batch-size") == "32"
    (state,) = [m for m in trainer["volumeMounts"] if m["mountPath"] == flag(trainer["args"],
                                                                             "--state-dir")]
    assert state["name"] == "data" and state["subPath"] == "trainer"  # the replica's volume
    headless = one(objects, "Service", HEADLESS)
    assert {p["name"] for p in headless["spec"]["ports"]} == {"http", "admin", "trainer-metrics"}


def test_network_policy_ports_and_peers(rendered):
    objects = rendered["trainer-deployment"]
    policy = one(objects, "NetworkPolicy", FULL)
    pod_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    trainer_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    api, admin = policy["spec"]["ingress"]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers = api["from"]
    assert peers[0] == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "gateway"}}}
    assert any(p.get("namespaceSelector", {}).get("matchLabels") == {
        "kubernetes.io/metadata.name": "monitoring"} for p in peers)  # Prometheus: /metrics
    assert admin["ports"] == [{"port": "admin", "protocol": "TCP"}]
    selectors = [p["podSelector"]["matchLabels"] for p in admin["from"]]
    assert any(sel.items() <= trainer_labels.items() for sel in selectors)
    assert not any(sel.items() <= pod_labels.items() for sel in selectors)
    test_pod = one(objects, "Pod")["metadata"]["labels"]
    assert any(sel.items() <= test_pod.items() for sel in selectors)
    assert all("namespaceSelector" not in p for p in admin["from"])  # this namespace only
    trainer_policy = one(objects, "NetworkPolicy", TRAINER)
    (rule,) = trainer_policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
    # Open API (default peers): a rule without `from` admits every source.
    open_api = one(rendered["sidecar-trainer"], "NetworkPolicy")["spec"]["ingress"]
    assert "from" not in open_api[0]
    assert open_api[2]["ports"] == [{"port": "trainer-metrics", "protocol": "TCP"}]


def test_gpu_replicas(rendered):
    objects = rendered["gpu"]
    server = container(objects, "StatefulSet", "server")
    assert flag(server["args"], "--device") == "cuda"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["resources"]["limits"]["memory"] == "48Gi"
    assert flag(server["args"], "--num-threads") == "7"
    spec = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "--device" not in container(rendered["default"], "StatefulSet", "server")["args"]


def test_autoscaling(rendered):
    hpa_objects = rendered["hpa"]
    sts = one(hpa_objects, "StatefulSet")
    assert "replicas" not in sts["spec"]  # the autoscaler owns it
    hpa = one(hpa_objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": FULL}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"] == {"metric": {"name": "e3rl_requests_waiting"},
                              "target": {"type": "AverageValue", "averageValue": "2"}}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    # The ScaledObject (a CRD: checked by structure).
    scaled = one(rendered["keda"], "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert "replicas" not in one(rendered["keda"], "StatefulSet")["spec"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                      "name": FULL}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    assert isinstance(spec["pollingInterval"], int) and isinstance(spec["cooldownPeriod"], int)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values())  # KEDA wants strings
    assert meta["query"] == (f'sum(e3rl_requests_waiting{{namespace="{NAMESPACE}", '
                             f'pod=~"{FULL}-[0-9]+"}})')
    assert meta["threshold"] == "4" and meta["activationThreshold"] == "1"
    assert meta["serverAddress"] == "http://prometheus.monitoring.svc:9090"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["policies"][0]["type"] == "Pods"


def test_model_sources(rendered):
    objects = rendered["model-pvc"]
    spec = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    server = container(objects, "StatefulSet", "server")
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "model"]
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True,
                     "subPath": "qwen3-4b-e3rl"}
    assert flag(server["args"], "--model") == "/models"
    assert flag(server["args"], "--served-model-name") == "qwen3-4b"
    host = rendered["model-hostpath"]
    spec = one(host, "StatefulSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/mnt/models/arith-chain",
                                            "type": "Directory"}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}  # persistence off
    assert "volumeClaimTemplates" not in one(host, "StatefulSet")["spec"]
    assert "runAsUser" not in spec["securityContext"]
    image = rendered["default"]
    assert "model" not in {v["name"] for v in
                           one(image, "StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    # The trainer loads the same model from the same source.
    both = render(*value_sets()["model-pvc"], *sets(**{"trainer.enabled": True}))
    trainer = container(both, "Deployment", "trainer")
    assert flag(trainer["args"], "--model") == "/models"
    assert [m for m in trainer["volumeMounts"] if m["name"] == "model"] == [mount]


def test_helm_test_pod(rendered):
    pod = one(rendered["default"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"]
    compile(c["command"][2], "helm-test", "exec")  # the script is valid Python
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["E3RL_TEST_API_URL"] == f"http://{FULL}:8000"
    assert env["E3RL_TEST_ADMIN_URL"] == \
        f"http://{FULL}-0.{HEADLESS}.{NAMESPACE}.svc.cluster.local:8001"
    assert "e3rl_erasures_total" in c["command"][2] and "401" in c["command"][2]


def test_labels_and_names_fit_kubernetes_limits():
    long_release = "a-very-long-release-name-for-a-fleet-of-e3rl-servers"  # 51 characters
    done = subprocess.run([helm(), "template", long_release, str(CHART), *sets(**{
        "trainer.enabled": True})], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for obj in yaml.safe_load_all(done.stdout):
        if obj:
            assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
            if obj["kind"] == "StatefulSet":  # pods get -N and a revision-hash label
                assert len(obj["metadata"]["name"]) <= 52


# -- the flag maps against the real parsers ----------------------------------------------
def test_server_args_are_exactly_the_serve_flags_the_chart_leaves_open():
    from e3rl.server.cli import SERVE_FLAGS

    props = schema()["properties"]["server"]["properties"]["args"]["properties"]
    flags = {f[2:]: t for f, _, t, _ in SERVE_FLAGS}
    assert set(props) == (set(flags) - SERVER_OWNED) | {"metrics-require-auth", "no-access-log"}
    assert SERVER_OWNED <= set(flags)
    kinds_of = {"int": "integer", "float": "number", "str": "string", "json_object": "object"}
    for name, typ in flags.items():
        if name in props:
            assert kinds_of[typ.__name__] in props[name]["type"], name
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["server"]["args"]) == set(props)


def test_trainer_args_are_exactly_the_follow_flags_the_chart_leaves_open():
    from e3rl.trainer.config import FollowConfig

    props = schema()["properties"]["trainer"]["properties"]["args"]["properties"]
    fields = {f.name: f.type for f in dataclasses.fields(FollowConfig)}
    assert TRAINER_OWNED <= set(fields)
    assert set(props) == {n.replace("_", "-") for n in set(fields) - TRAINER_OWNED}
    kinds_of = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}
    for name, typ in fields.items():
        if name not in TRAINER_OWNED:
            assert kinds_of[typ] in props[name.replace("_", "-")]["type"], name
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["trainer"]["args"]) == set(props)


SAMPLES = {"integer": 3, "number": 0.25, "string": "x", "boolean": True, "object": {"enabled": False}}
SPECIAL = {"dtype": "bfloat16", "attention-backend": "sdpa", "model-impl": "transformers",
           "log-level": "warning",
           "store": "erasures", "store-synchronous": "NORMAL", "signals": "rewards",
           "max-request-bytes": 4096, "max-model-len": 64, "min-entropy-ratio": 0.5,
           "baseline-momentum": 0.5, "consumer": "trainer-b", "gate-data": "arith-chain:validation",
           "reference": "/models/ref", "served-model-name": "m"}


def every_arg(props: dict) -> dict:
    values = {}
    for name, prop in props.items():
        kind = next(t for t in prop["type"] if t != "null") if isinstance(prop["type"], list) \
            else prop["type"]
        values[name] = SPECIAL.get(name, SAMPLES[kind])
    return values


def test_every_mapped_flag_reaches_the_parsers():
    """Every key of ``server.args`` and ``trainer.args``, set, renders flags that ``e3rl
    serve`` and ``e3rl train follow`` accept, with the values given."""
    from e3rl.server.cli import build_parser
    from e3rl.trainer.config import FollowConfig

    props = schema()["properties"]
    server_args = every_arg(props["server"]["properties"]["args"]["properties"])
    trainer_args = every_arg(props["trainer"]["properties"]["args"]["properties"])
    objects = render(*sets(**{"server.args": server_args, "trainer.enabled": True,
                              "trainer.args": trainer_args}))
    parser = build_parser()
    served = parser.parse_args(container(objects, "StatefulSet", "server")["args"])
    for name, value in server_args.items():
        if name == "no-access-log":
            assert served.access_log is False
        else:
            assert getattr(served, name.replace("-", "_")) == value, name
    follow = parser.parse_args(container(objects, "Deployment", "trainer")["args"])
    for name, value in trainer_args.items():
        assert getattr(follow, name.replace("-", "_")) == value, name
    names = {f.name for f in dataclasses.fields(FollowConfig)}
    FollowConfig(**{k: v for k, v in vars(follow).items() if k in names})  # a valid config
    false = render(*sets(**{"trainer.enabled": True, "trainer.args.segment-weights": False,
                            "server.args.metrics-require-auth": False}))
    assert parser.parse_args(container(false, "Deployment", "trainer")["args"]).segment_weights \
        is False
    assert "--metrics-require-auth" not in container(false, "StatefulSet", "server")["args"]


def test_values_yaml_documents_the_monitoring_keys():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["serviceMonitor"]) >= {"enabled", "interval", "labels"}
    assert set(values["prometheusRule"]) >= {"enabled", "labels", "alerts"}
    assert set(values["grafanaDashboard"]) >= {"enabled", "labels"}
    for key in ("replicaCount", "networkPolicy", "autoscaling", "image", "resources"):
        assert key in values
    assert values["trainer"]["mode"] in ("sidecar", "deployment")
    assert os.path.exists(CHART / "templates" / "NOTES.txt")
