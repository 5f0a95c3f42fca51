"""The chart's rendered containers, run as local processes: the loop works as deployed.

The chart is rendered with 2 replicas and the trainer Deployment (small trainer settings given
as values, which also checks that they reach its command). Each rendered container's command
(the image's ENTRYPOINT, ``e3rl``, from deploy/Dockerfile, run as ``python -m
e3rl.server.cli``), args and environment (the image's ENV, then the container's, with
``secretKeyRef``s resolved from the rendered Secret) run unchanged, except what a laptop is not
a cluster for:

- each pod's container ports become free loopback ports (``--port``, ``--admin-port``,
  ``--metrics-port``), and ``--host 0.0.0.0`` / ``--metrics-host 0.0.0.0`` bind 127.0.0.1;
- every volume ``mountPath`` (and the image's paths: the baked model becomes the repository's
  models/arith-chain, the baked kernel cache the local one) becomes a directory of the test;
- ``--servers-dns HOST:PORT`` becomes ``--servers-file`` listing the replicas' mapped admin
  URLs, after checking that HOST is the StatefulSet's headless Service and PORT its admin
  port (the DNS answer cannot be faked without root);
- the ``helm test`` pod's URLs (the client Service, pod 0 through the headless Service) point
  at the mapped ports.

Then traffic with feedback (examples/traffic.py) goes to both replicas; the trainer pulls the
trajectories and pushes a new weight version, which both replicas' ``/v1/models`` report;
every probe answers on its mapped port; the ``helm test`` script passes; and SIGTERM stops
each replica within the rendered grace period. This catches wrong flags, environment names,
ports and paths between the chart, the image and the code.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.chart import NAMESPACE, ROOT, one, render, sets

MODEL = ROOT / "models" / "arith-chain"
API_KEY, ADMIN_KEY = "client-key-for-the-chart-test", "admin-key-for-the-chart-test"
VALUES = {
    "replicaCount": 2,
    "auth.apiKey": API_KEY,
    "auth.adminKey": ADMIN_KEY,
    "server.args.num-threads": 1,
    "server.args.kv-cache-memory-gb": 0.05,
    "server.drainTimeoutS": 5,
    "server.preStopSleepSeconds": 1,
    "terminationGracePeriodSeconds": 20,
    "trainer.enabled": True,
    "trainer.mode": "deployment",
    "trainer.args": {"batch-size": 8, "settled-s": 0, "poll-interval-s": 0.2, "lr": 1e-5,
                     "num-threads": 1, "push-retries": 2, "request-timeout-s": 10,
                     "stall-timeout-s": 60},
}
PORT_FLAGS = ("--port", "--admin-port", "--metrics-port")
HOST_FLAGS = ("--host", "--metrics-host")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile_runtime() -> tuple[list[str], dict[str, str]]:
    """The image's ENTRYPOINT and the ENV of its last stage."""
    from tests.deploy.test_image import env_of, json_form, stages

    runtime = stages()[-1]
    return json_form(runtime, "ENTRYPOINT"), env_of(runtime)


class Pod:
    """One rendered container as a local process: its ports and paths mapped."""

    def __init__(self, name: str, spec: dict, container: dict, secret: dict[str, str],
                 paths: dict[str, Path], tmp: Path):
        self.name, self.container = name, container
        self.ports = {p["name"]: (p["containerPort"], free_port()) for p in container["ports"]}
        self.paths = dict(paths)  # mountPath (or image path) -> local directory
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in container["volumeMounts"]:
            local = tmp / name / mount["name"] / mount.get("subPath", "")
            if mount["name"] == "model":
                local = MODEL
            assert mount["name"] in volumes or mount["name"] == "data", mount
            local.mkdir(parents=True, exist_ok=True)
            self.paths[mount["mountPath"]] = local
        self.secret = secret
        self.proc: subprocess.Popen | None = None
        self.log = tmp / f"{name}-{container['name']}.log"

    def port(self, name: str) -> int:
        return self.ports[name][1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port(name)}"

    def map_path(self, value: str) -> str:
        for prefix in sorted(self.paths, key=len, reverse=True):
            if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                return str(self.paths[prefix]) + value[len(prefix.rstrip("/")):]
        return value

    def argv(self, entrypoint: list[str], rewrite: dict[str, list[str]]) -> list[str]:
        assert entrypoint == ["e3rl"] and "command" not in self.container
        args = [self.map_path(a) for a in self.container["args"]]
        out = [sys.executable, "-m", "e3rl.server.cli"]
        by_number = {str(inside): local for inside, local in self.ports.values()}
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in rewrite:
                out += rewrite[arg]
                i += 2
                continue
            out.append(arg)
            if arg in PORT_FLAGS:
                out.append(str(by_number[args[i + 1]]))
                i += 1
            elif arg in HOST_FLAGS:
                assert args[i + 1] == "0.0.0.0", (arg, args[i + 1])
                out.append("127.0.0.1")
                i += 1
            i += 1
        return out

    def env(self, image_env: dict[str, str]) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"]}
        for key, value in image_env.items():
            if key != "PATH":
                env[key] = self.map_path(value)
        for item in self.container.get("env", []):
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secret[ref["key"]]
            else:
                env[item["name"]] = self.map_path(item["value"])
        return env

    def start(self, argv: list[str], env: dict[str, str]) -> None:
        with open(self.log, "w") as log:
            log.write(shlex.join(argv) + "\n")
            log.flush()
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.paths["/tmp"])

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def probe(self, probe: dict) -> int:
        get = probe["httpGet"]
        port = self.port(get["port"]) if isinstance(get["port"], str) else None
        return httpx.get(f"http://127.0.0.1:{port}{get['path']}",
                         timeout=probe["timeoutSeconds"]).status_code

    def wait_probe(self, probe: dict, budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        while True:
            assert self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
            try:
                if self.probe(probe) == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.name}: {probe} failed: {self.tail()}"
            time.sleep(0.5)


@pytest.fixture
def deployed(tmp_path):
    from e3rl.engine import kernels

    objects = render(*sets(**VALUES))
    entrypoint, image_env = dockerfile_runtime()
    secret = {k: base64.b64decode(v).decode()
              for k, v in one(objects, "Secret")["data"].items()}
    sts = one(objects, "StatefulSet")
    # The image's own paths: the baked model and the prebuilt kernel cache.
    (built,) = kernels.prebuild([kernels.cpu_isa()])
    image_paths = {image_env["E3RL_MODEL"]: MODEL,
                   image_env["TORCH_EXTENSIONS_DIR"]: built.parent.parent}
    full = sts["metadata"]["name"]
    servers = []
    for ordinal in range(sts["spec"]["replicas"]):
        spec = sts["spec"]["template"]["spec"]
        (server,) = [c for c in spec["containers"] if c["name"] == "server"]
        servers.append(Pod(f"{full}-{ordinal}", spec, server, secret, image_paths, tmp_path))
    dep = one(objects, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    trainer = Pod(dep["metadata"]["name"], spec, spec["containers"][0], secret, image_paths,
                  tmp_path)
    yield objects, entrypoint, image_env, servers, trainer, tmp_path
    for pod in [trainer, *servers]:
        if pod.proc is not None and pod.proc.poll() is None:
            pod.proc.kill()
            pod.proc.wait()


def test_the_rendered_fleet_serves_learns_and_swaps(deployed):
    objects, entrypoint, image_env, servers, trainer, tmp = deployed
    sts = one(objects, "StatefulSet")
    for pod in servers:
        argv = pod.argv(entrypoint, {})
        assert argv[3] == "serve" and "--admin-key" not in argv
        pod.start(argv, pod.env(image_env))
    for pod in servers:
        c = pod.container
        pod.wait_probe(c["startupProbe"], 120)
        assert pod.probe(c["readinessProbe"]) == 200 and pod.probe(c["livenessProbe"]) == 200
    api = [pod.url("http") for pod in servers]
    admin = [pod.url("admin") for pod in servers]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for url in api:  # the API key came from the Secret through E3RL_API_KEY
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0][
            "weight_version"] == "0"

    # The trainer: the rendered command, but the DNS name becomes a file of mapped URLs.
    args = trainer.container["args"]
    host, _, port = args[args.index("--servers-dns") + 1].rpartition(":")
    assert host == f"{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local"
    admin_port = {p["name"]: p["containerPort"]
                  for p in servers[0].container["ports"]}["admin"]
    assert int(port) == admin_port
    servers_file = tmp / "servers.txt"
    servers_file.write_text("\n".join(admin) + "\n")
    argv = trainer.argv(entrypoint, {"--servers-dns": ["--servers-file", str(servers_file)]})
    assert argv[3:5] == ["train", "follow"]
    for flag, value in (("--batch-size", "8"), ("--settled-s", "0"), ("--num-threads", "1")):
        assert argv[argv.index(flag) + 1] == value
    trainer.start(argv, trainer.env(image_env))

    # Traffic with feedback on half of the requests, to both replicas.
    summary = tmp / "traffic.json"
    traffic = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "traffic.py"), *sum((["--url", u] for u in api),
                                                                     []),
         "--api-key", API_KEY, "--max-requests", "32", "--duration-s", "120",
         "--concurrency", "4", "--feedback-fraction", "0.5", "--max-tokens", "64",
         "--seed", "3", "--out", str(summary)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert traffic.returncode == 0, traffic.stdout[-2000:] + traffic.stderr[-2000:]

    # A weight version pushed to both replicas.
    trainer.wait_probe(trainer.container["startupProbe"], 120)
    deadline = time.monotonic() + 180
    while True:
        assert trainer.proc.poll() is None, f"trainer exited: {trainer.tail()}"
        seen = [httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0][
            "weight_version"] for url in api]
        # The first pushed version: "1", or a later update number when the first batch
        # carried no signal (equal rewards) or a candidate was refused.
        if seen[0] != "0" and len(set(seen)) == 1:
            break
        assert time.monotonic() < deadline, f"versions {seen}; trainer: {trainer.tail()}"
        time.sleep(1)
    assert trainer.probe(trainer.container["livenessProbe"]) == 200
    metrics = httpx.get(f"{trainer.url('metrics')}/metrics").text
    pulled = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^e3rl_trainer_trajectories_pulled_total\{server="([^"]+)"\} (\S+)$', metrics, re.M)}
    assert set(pulled) == set(admin) and all(v > 0 for v in pulled.values()), pulled
    records = [json.loads(line) for line in (trainer.paths["/var/lib/e3rl/trainer"]
                                             / "follow_log.jsonl").read_text().splitlines()]
    pushed = [r for r in records if r["outcome"] == "pushed"]
    assert pushed and all(len(r["push"]) == 2 and set(r["push"].values()) == {"ok"}
                          for r in pushed), records
    assert (trainer.paths["/var/lib/e3rl/trainer"] / "state.json").is_file()  # on its volume
    for pod in servers:  # each replica's store is on its own volume
        assert (pod.paths["/var/lib/e3rl/data"] / "trajectories.sqlite3").is_file()

    # `helm test`'s script, against the mapped Service and pod addresses.
    test_pod = one(objects, "Pod")
    (c,) = test_pod["spec"]["containers"]
    assert c["command"][0] == "python"
    hosts = {f"http://{sts['metadata']['name']}:8000": servers[0].url("http"),
             f"http://{sts['metadata']['name']}-0.{sts['spec']['serviceName']}.{NAMESPACE}"
             f".svc.cluster.local:{admin_port}": servers[0].url("admin")}
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp)}
    for item in c["env"]:
        if "valueFrom" in item:
            env[item["name"]] = {"api-key": API_KEY}[item["valueFrom"]["secretKeyRef"]["key"]]
        elif item["name"] != "HOME":
            env[item["name"]] = hosts.get(item["value"], item["value"])
    assert set(hosts.values()) <= set(env.values()), env
    done = subprocess.run([sys.executable, *c["command"][1:]], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 5, done.stdout

    # SIGTERM: every process ends cleanly, each replica within the rendered grace period
    # (minus the preStop sleep that a kubelet runs first).
    spec = sts["spec"]["template"]["spec"]
    budget = spec["terminationGracePeriodSeconds"] - int(
        servers[0].container["lifecycle"]["preStop"]["exec"]["command"][1])
    for pod in [trainer, *servers]:
        pod.proc.send_signal(signal.SIGTERM)
    for pod in servers:
        assert pod.proc.wait(timeout=budget) == 0, pod.tail()
    assert trainer.proc.wait(timeout=60) == 0, trainer.tail()
