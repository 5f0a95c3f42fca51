"""The following trainer's own ``/metrics`` (``e3rl_trainer_*``) and ``/health``.

A small HTTP server in a daemon thread: ``/metrics`` in Prometheus' text format (its own
registry, never the process-wide default), ``/health`` 200 while the loop completes a poll
at least every ``stall_timeout_s`` seconds, else 503 with the reason.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.updates = Counter("e3rl_trainer_updates", "Updates by outcome: pushed, refused "
                               "(a guard or the gate), dry_run, no_rows (nothing to learn "
                               "from: every advantage was 0).", ["outcome"], registry=r)
        self.pulled = Counter("e3rl_trainer_trajectories_pulled", "Trajectories pulled, by "
                              "server.", ["server"], registry=r)
        self.skipped = Counter("e3rl_trainer_trajectories_skipped", "Trajectories not "
                               "learned from, by server and reason.", ["server", "reason"],
                               registry=r)
        self.used = Counter("e3rl_trainer_trajectories_used", "Trajectories learned from, by "
                            "signal (reward, reward-free).", ["signal"], registry=r)
        self.pull_lag_s = Gauge("e3rl_trainer_pull_lag_seconds", "Age of the newest "
                                "trajectory pulled from a server, at the pull.", ["server"],
                                registry=r)
        self.pull_lag = Gauge("e3rl_trainer_pull_lag_trajectories", "Trajectories a server "
                              "holds beyond the trainer's cursor, at the last pull.",
                              ["server"], registry=r)
        self.pull_errors = Counter("e3rl_trainer_pull_errors", "Failed pulls, by server.",
                                   ["server"], registry=r)
        self.buffered = Gauge("e3rl_trainer_buffered_trajectories", "Pulled, usable "
                              "trajectories waiting for the next update.", registry=r)
        self.version = Gauge("e3rl_trainer_last_pushed_version", "The newest version the "
                             "trainer accepted (what every replica should serve).", registry=r)
        self.replica_version = Gauge("e3rl_trainer_replica_version", "The version each "
                                     "replica reported last (-1: unreachable).", ["server"],
                                     registry=r)
        self.replicas_behind = Gauge("e3rl_trainer_replicas_behind", "Replicas not serving "
                                     "the accepted version (a split fleet).", registry=r)
        self.push_failures = Counter("e3rl_trainer_push_failures", "Weight pushes that "
                                     "failed after their retries, by server.", ["server"],
                                     registry=r)
        self.loss = Gauge("e3rl_trainer_loss", "Loss of the last update.", registry=r)
        self.reward = Gauge("e3rl_trainer_reward_mean", "Mean reward of the last update's "
                            "rewarded trajectories.", registry=r)
        self.kl = Gauge("e3rl_trainer_kl", "Mean KL of the last candidate to the reference "
                        "on its batch.", registry=r)
        self.entropy = Gauge("e3rl_trainer_entropy", "Mean token entropy of the last "
                             "candidate on its batch.", registry=r)
        self.gate = Gauge("e3rl_trainer_gate_pass_rate", "Gate-set greedy pass@1 of the last "
                          "candidate and of the serving model.", ["model"], registry=r)
        self.refusals = Counter("e3rl_trainer_gate_refusals", "Candidates not pushed, by "
                                "guard (kl, entropy, gate).", ["reason"], registry=r)
        self.last_poll = Gauge("e3rl_trainer_last_poll_timestamp_seconds", "Unix time of the "
                               "last completed poll.", registry=r)
        self.last_update = Gauge("e3rl_trainer_last_update_timestamp_seconds", "Unix time of "
                                 "the last update.", registry=r)
        self.steps = Gauge("e3rl_trainer_steps", "Updates made so far (this run and the ones "
                           "it resumed).", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/metrics`` and ``/health`` on ``host:port`` (a daemon thread)."""

    def __init__(self, metrics: TrainerMetrics, host: str, port: int, stall_timeout_s: float):
        self.metrics = metrics
        self.stall_timeout_s = stall_timeout_s
        self.last_poll = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, server.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    status, body = server.health()
                    self._send(status, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b'{"error": "not found"}', "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not log lines
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="trainer-http",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def beat(self) -> None:
        """The loop completed a poll."""
        self.last_poll = time.monotonic()

    def health(self) -> tuple[int, dict]:
        idle = time.monotonic() - self.last_poll
        if idle > self.stall_timeout_s:
            return 503, {"status": "stalled", "seconds_since_last_poll": round(idle, 1)}
        return 200, {"status": "ok", "seconds_since_last_poll": round(idle, 1)}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
