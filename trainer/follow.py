"""``e3rl train follow``: learn from live servers' traffic and hot-swap the weights.

One poll: find the replicas, bring any replica that is not serving the accepted version up
to date, pull new settled trajectories from each, and once ``batch_size`` usable ones are
in hand, update. An update:

1. rows from the batch (`signals.build_rows`), one actor update (the RL trainer's loss);
2. guards on the candidate: KL to the reference and token entropy on the batch, then the
   gate set's greedy pass@1 against the serving model's (optional);
3. a checkpoint (``checkpoints/step-K``, or ``refused/step-K`` for inspection), the ledger
   line that lists every trajectory it used or skipped, then ``state.json`` with the
   per-store cursors it covers (tmp + fsync + rename: the commit point);
4. accepted: upload to every replica (timeouts, retries; a replica left behind is retried
   every poll and shown in ``e3rl_trainer_replicas_behind``), then acknowledge the cursors
   so the servers' retention may delete what was used. Refused: the model and optimizer go
   back to the serving checkpoint.

Exactly once: cursors are committed only in ``state.json``, after the checkpoint and ledger
that cover them, and trajectories are deduplicated by id; a SIGKILL anywhere re-pulls from
the committed cursors, and a checkpoint or ledger line newer than ``state.json`` is
discarded at start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .actor import Actor, collate
from .config import FollowConfig
from .fleet import Fleet, ReplicaError, discover
from .follow_metrics import HealthServer, TrainerMetrics
from .run_log import RunLog, read_records
from .signals import Usable, build_rows, classify
from .trainer import _load

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
LEDGER_FILE = "ledger.jsonl"
LOG_FILE = "follow_log.jsonl"
_WARN_INTERVAL_S = 30.0
_NO_RECORDS = 2 ** 62  # an ``after`` past every cursor: a pull that only reads the store id


@dataclass
class FollowState:
    """What ``state.json`` holds: the commit point of every update."""

    update: int = 0  # updates made (accepted, refused or without rows)
    accepted: int = 0  # accepted updates: the serving version's staleness index
    version: str = ""  # the version every replica should serve
    serving: str = "checkpoints/step-000000"  # its checkpoint, relative to the state dir
    versions: dict[str, int] = field(default_factory=dict)  # version -> accepted index
    cursors: dict[str, int] = field(default_factory=dict)  # store id -> committed cursor
    baseline: float | None = None  # running mean reward of single samples
    gate_serving: float | None = None  # the serving model's gate pass@1

    @classmethod
    def load(cls, path: Path) -> FollowState:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path} is unreadable: {exc}") from exc

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.__dict__, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        ckpt._fsync_dir(path.parent)


@dataclass(slots=True)
class Replica:
    url: str
    store_id: str | None = None
    version: str | None = None


class Follower:
    def __init__(self, config: FollowConfig, admin_key: str):
        self.config = c = config
        for name in ("model", "reference"):
            path = getattr(c, name)
            if path and not (Path(path) / "config.json").is_file():
                raise ValueError(f"--{name}: no model directory at {path} (config.json "
                                 "missing)")
        self.dir = Path(c.state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        self.device = torch.device(c.device)
        self.tokenizer, self.model = _load(c.model, c.dtype, self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr,
                                           betas=(c.adam_beta1, c.adam_beta2),
                                           weight_decay=c.weight_decay)
        self.ref = _load(c.reference or c.model, c.dtype, self.device)[1].eval()
        self.ref.requires_grad_(False)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        self.pad_id = pad_id
        self.actor = Actor(self.model, self.optimizer, c,  # type: ignore[arg-type]
                           pad_id, self.ref if c.kl_coef > 0 else None)
        self.fleet = Fleet(c, admin_key)
        self.metrics = TrainerMetrics()
        self.health = (HealthServer(self.metrics, c.metrics_host, c.metrics_port,
                                    c.stall_timeout_s) if c.metrics_port else None)
        self.stop = threading.Event()
        self.replicas: dict[str, Replica] = {}
        self.buffers: dict[str, deque] = {}  # store id -> pulled (cursor, record) in order
        self.fetched: dict[str, int] = {}  # store id -> cursor of the last record pulled
        self.consumed: dict[str, int] = {}  # store id -> cursor of the last record taken
        self.acked: dict[str, int] = {}
        self.batch: list[Usable] = []
        self.batch_skipped: dict[str, list[str]] = {}
        self._warned: dict[str, float] = {}
        self.gate_llm = None
        self.gate_problems = None
        self.state = self._start()
        # The ledger keeps only the updates state.json covers; their ids are never reused.
        self.ledger = RunLog(self.dir / LEDGER_FILE, after_step=self.state.update)
        self.used_ids = {i for rec in read_records(self.dir / LEDGER_FILE)
                         for i in rec.get("used", []) + sum(rec.get("skipped", {}).values(), [])}
        self.log = RunLog(self.dir / LOG_FILE, after_step=self.state.update)
        self.metrics.steps.set(self.state.update)
        self.metrics.version.set(_number(self.state.version))

    # -- start and resume ----------------------------------------------------------------
    def _start(self) -> FollowState:
        """Resume from ``state.json`` (dropping anything newer than it), or begin: the
        servers' current version becomes the base, saved as ``checkpoints/step-000000``."""
        path = self.dir / STATE_FILE
        if path.exists():
            state = FollowState.load(path)
            for sub in ("checkpoints", "refused"):
                for d in (self.dir / sub).glob("step-*"):
                    if int(d.name.split("-")[1]) > state.update:
                        logger.info("discarding %s (newer than %s)", d, STATE_FILE)
                        shutil.rmtree(d)
            self._restore(self.dir / state.serving)
            logger.info("resumed at update %d, serving version %s (%s)", state.update,
                        state.version, state.serving)
            return state
        base = self._base_version()
        state = FollowState(version=base, versions={base: 0})
        ckpt.save_checkpoint(self.dir / state.serving, self.model, self.tokenizer,
                             self.optimizer, source_model=self.config.model,
                             meta={"version": base, "step": 0, "parent": None})
        state.write(path)
        logger.info("following from version %s of %s", base, self.config.model)
        return state

    def _base_version(self) -> str:
        """The version the replicas serve at a fresh start (the most common one); waits,
        bounded by the stall timeout, for at least one replica to answer."""
        deadline = time.monotonic() + self.config.stall_timeout_s
        while True:
            versions = []
            for url in discover(self.config):
                try:
                    versions.append(self.fleet.version(url))
                except ReplicaError as exc:
                    logger.warning("%s", exc)
            if versions:
                base, count = Counter(versions).most_common(1)[0]
                if count < len(versions):
                    logger.warning("replicas serve different versions %s; following %s and "
                                   "bringing the others to it", sorted(set(versions)), base)
                return base
            if time.monotonic() > deadline or self.stop.is_set():
                raise ReplicaError("no replica answered; check --server / --servers-file / "
                                   "--servers-dns and E3RL_ADMIN_KEY")
            time.sleep(min(5.0, self.config.poll_interval_s * 5))

    def _restore(self, path: Path) -> None:
        """Model weights and optimizer state of a checkpoint directory."""
        from safetensors.torch import load_file

        tensors = load_file(str(path / "model.safetensors"), device=str(self.device))
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        if unexpected or (set(missing) - tied - {"lm_head.weight"}):
            raise ValueError(f"checkpoint {path} does not fit the model (missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        state = ckpt.load_state(path)
        self.optimizer.state.clear()
        ckpt.restore_optimizer(self.model, self.optimizer, state.optimizer,
                               state.meta["param_groups"])

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> FollowState:
        """Poll and update until ``max_updates`` updates were made or a stop signal came."""
        c = self.config
        if self.health is not None:
            self.health.start()
            logger.info("trainer metrics on http://%s:%d/metrics", c.metrics_host,
                        self.health.port)
        start_update = self.state.update
        try:
            while not self.stop.is_set():
                if c.max_updates and self.state.update - start_update >= c.max_updates:
                    break
                progressed = self.poll()
                if len(self.batch) >= c.batch_size:
                    self.update()
                elif not progressed:
                    self.stop.wait(c.poll_interval_s)
        finally:
            if self.health is not None:
                self.health.close()
            self.fleet.close()
        return self.state

    def poll(self) -> bool:
        """One round over the replicas; True if any trajectory was pulled."""
        urls = discover(self.config)
        progressed = False
        behind = 0
        for url in urls:
            replica = self.replicas.setdefault(url, Replica(url))
            if not self._reconcile(replica):
                behind += 1
            progressed |= self._pull(replica)
            self._ack(replica)
        self.metrics.replicas_behind.set(behind)
        self._fill_batch()
        self.metrics.buffered.set(len(self.batch))
        self.metrics.last_poll.set(time.time())
        if self.health is not None:
            self.health.beat()
        return progressed

    def _reconcile(self, replica: Replica) -> bool:
        """Bring ``replica`` to the accepted version if it serves another; True if it
        serves the accepted version now."""
        try:
            replica.version = self.fleet.version(replica.url)
        except ReplicaError as exc:
            self._warn(replica.url, "replica %s unreachable: %s", replica.url, exc)
            replica.version = None
            self.metrics.replica_version.labels(replica.url).set(-1)
            return False
        if replica.version != self.state.version and not self.config.dry_run:
            logger.warning("replica %s serves version %s, not %s: pushing", replica.url,
                           replica.version, self.state.version)
            result = self.fleet.push(replica.url, self._weights(self.state.serving),
                                     self.state.version)
            if result.ok:
                replica.version = self.state.version
            else:
                self.metrics.push_failures.labels(replica.url).inc()
                logger.warning("push to %s failed after %d attempt(s): %s", replica.url,
                               result.attempts, result.error)
        self.metrics.replica_version.labels(replica.url).set(_number(replica.version))
        return replica.version == self.state.version or self.config.dry_run

    def _pull(self, replica: Replica) -> bool:
        c = self.config
        try:
            if replica.store_id is None:
                replica.store_id = self.fleet.pull(replica.url, _NO_RECORDS, 1).store_id
            store = replica.store_id
            buffer = self.buffers.setdefault(store, deque())
            if len(buffer) >= c.batch_size:
                return False
            after = self.fetched.get(store, self.state.cursors.get(store, 0))
            page = self.fleet.pull(replica.url, after, c.pull_limit)
        except ReplicaError as exc:
            self._warn(replica.url, "pull from %s failed: %s", replica.url, exc)
            self.metrics.pull_errors.labels(replica.url).inc()
            return False
        if page.store_id != store:  # the replica's store was replaced: start it afresh
            logger.warning("replica %s has a new trajectory store (%s, was %s)", replica.url,
                           page.store_id, store)
            replica.store_id = None
            return False
        for record in page.records:
            buffer.append((int(record["cursor"]), record))
        self.fetched[store] = page.next_cursor
        self.metrics.pulled.labels(replica.url).inc(len(page.records))
        if page.records:
            created = page.records[-1].get("created_at")
            if created is not None:
                self.metrics.pull_lag_s.labels(replica.url).set(max(0.0, time.time() - created))
        if page.last_cursor is not None:
            self.metrics.pull_lag.labels(replica.url).set(page.last_cursor - page.next_cursor)
        return bool(page.records)

    def _fill_batch(self) -> None:
        """Take pulled records in order within each store, one store after the other in
        turn (no replica starves another), until the batch is full; every record taken is
        either in the batch or skipped with a reason."""
        c = self.config
        urls = {r.store_id: r.url for r in self.replicas.values() if r.store_id}
        while len(self.batch) < c.batch_size and any(self.buffers.values()):
            for store, buffer in self.buffers.items():
                if not buffer or len(self.batch) >= c.batch_size:
                    continue
                cursor, record = buffer.popleft()
                self.consumed[store] = cursor
                rid = str(record.get("id"))
                outcome = ("duplicate" if rid in self.used_ids else
                           classify(record, c, self.state.versions, self.state.accepted))
                self.used_ids.add(rid)
                if isinstance(outcome, str):
                    self.batch_skipped.setdefault(outcome, []).append(rid)
                    self.metrics.skipped.labels(urls.get(store, store), outcome).inc()
                else:
                    self.batch.append(outcome)

    # -- an update -----------------------------------------------------------------------
    def update(self) -> dict:
        c = self.config
        t0 = time.monotonic()
        batch, self.batch = self.batch[:c.batch_size], self.batch[c.batch_size:]
        skipped, self.batch_skipped = self.batch_skipped, {}
        rows, stats, baseline = build_rows(batch, c, self.state.baseline,
                                           self.state.versions, self.state.accepted)
        k = self.state.update + 1
        record = {"step": k, "time": time.time(), "batch": len(batch),
                  "signals": dict(Counter(u.signal for u in batch)),
                  "skipped": {r: len(v) for r, v in skipped.items()},
                  "rows": stats.num_rows, "pair_rows": stats.num_pair_rows,
                  "reward_free_pairs": stats.num_reward_free_pairs,
                  "stale_tokens": stats.num_stale_tokens,
                  "reward_mean": (sum(stats.rewards) / len(stats.rewards)
                                  if stats.rewards else None),
                  "erasures_per_sample": sum(len(u.record.get("erasures") or [])
                                             for u in batch) / max(len(batch), 1)}
        reasons: list[str] = []
        if rows:
            record.update(self.actor.update(rows))
            kl, entropy, ref_entropy = self.measure(rows)
            record.update(candidate_kl=kl, candidate_entropy=entropy,
                          reference_entropy=ref_entropy)
            self.metrics.kl.set(kl)
            self.metrics.entropy.set(entropy)
            if c.max_kl and kl > c.max_kl:
                reasons.append(f"kl: {kl:.4f} > max_kl {c.max_kl}")
            if c.min_entropy_ratio and entropy < c.min_entropy_ratio * ref_entropy:
                reasons.append(f"entropy: {entropy:.4f} < {c.min_entropy_ratio} x the "
                               f"reference's {ref_entropy:.4f}")
            if not reasons and c.gate_data:
                gate = self.gate(str(k))
                record.update(gate_candidate=gate, gate_serving=self.state.gate_serving)
                if gate < self.state.gate_serving - c.gate_margin:
                    reasons.append(f"gate: pass@1 {gate:.3f} < serving "
                                   f"{self.state.gate_serving:.3f} - margin {c.gate_margin}")
        outcome = "no_rows" if not rows else ("refused" if reasons else
                                              ("dry_run" if c.dry_run else "pushed"))
        record["outcome"] = outcome
        # Commit: checkpoint, ledger line, then state.json (the point of no return).
        state = self.state
        state.update = k
        state.baseline = baseline
        for store, cursor in self.consumed.items():
            state.cursors[store] = cursor
        if rows:
            accepted = not reasons
            where = self.dir / ("checkpoints" if accepted else "refused") / f"step-{k:06d}"
            version = str(k)
            ckpt.save_checkpoint(where, self.model, self.tokenizer, self.optimizer,
                                 source_model=c.model,
                                 meta={"version": version, "step": k, "parent": state.version,
                                       "outcome": outcome, "refused_because": reasons,
                                       "metrics": {k2: v for k2, v in record.items()
                                                   if isinstance(v, (int, float))}})
            if accepted:
                state.accepted += 1
                state.versions[version] = state.accepted
                state.version, state.serving = version, str(where.relative_to(self.dir))
                if c.gate_data:
                    state.gate_serving = record["gate_candidate"]
        self.ledger.write({"step": k, "outcome": outcome,
                           "used": [str(u.record["id"]) for u in batch], "skipped": skipped})
        state.write(self.dir / STATE_FILE)
        self.metrics.updates.labels(outcome).inc()
        for u in batch:
            self.metrics.used.labels(u.signal).inc()
        self.metrics.steps.set(k)
        self.metrics.last_update.set(time.time())
        if "loss" in record:
            self.metrics.loss.set(record["loss"])
        if record["reward_mean"] is not None:
            self.metrics.reward.set(record["reward_mean"])
        if reasons:
            for reason in reasons:
                self.metrics.refusals.labels(reason.split(":")[0]).inc()
            logger.warning("update %d refused, not pushed (kept in %s): %s", k,
                           self.dir / "refused" / f"step-{k:06d}", "; ".join(reasons))
            self._restore(self.dir / state.serving)
            if self.gate_llm is not None:
                self.gate_llm.update_weights(self.model.state_dict(), state.version)
        elif rows:
            self.metrics.version.set(_number(state.version))
            if not c.dry_run:
                record["push"] = self._push_all()
            self._prune()
        record["seconds"] = round(time.monotonic() - t0, 3)
        self.log.write(record)
        logger.info("update %d: %s (%d trajectories: %s; loss %s, kl %s)", k, outcome,
                    len(batch), record["signals"], _fmt(record.get("loss")),
                    _fmt(record.get("candidate_kl")))
        if not c.dry_run:
            for replica in self.replicas.values():
                self._ack(replica)
        return record

    def _push_all(self) -> dict:
        urls = list(self.replicas)
        results = self.fleet.push_all(urls, self._weights(self.state.serving),
                                      self.state.version)
        for r in results:
            replica = self.replicas[r.url]
            if r.ok:
                replica.version = self.state.version
            else:
                self.metrics.push_failures.labels(r.url).inc()
                logger.warning("push of version %s to %s failed after %d attempt(s): %s; "
                               "retried every poll", self.state.version, r.url, r.attempts,
                               r.error)
            self.metrics.replica_version.labels(r.url).set(_number(replica.version))
        behind = sum(not r.ok for r in results)
        self.metrics.replicas_behind.set(behind)
        return {r.url: ("ok" if r.ok else r.error) for r in results}

    def _ack(self, replica: Replica) -> None:
        """Acknowledge the committed cursor of ``replica``'s store (retried every poll)."""
        store = replica.store_id
        cursor = self.state.cursors.get(store) if store else None
        if self.config.dry_run or cursor is None or self.acked.get(store) == cursor:
            return
        try:
            self.fleet.ack(replica.url, store, cursor)
            self.acked[store] = cursor
        except ReplicaError as exc:
            self._warn(replica.url, "ack to %s failed: %s", replica.url, exc)

    def _warn(self, key: str, message: str, *args) -> None:
        """A warning about ``key`` (a replica) at most every ``_WARN_INTERVAL_S``: a replica
        that is down for an hour must not write a line per poll."""
        now = time.monotonic()
        if now - self._warned.get(key, -_WARN_INTERVAL_S) >= _WARN_INTERVAL_S:
            self._warned[key] = now
            logger.warning(message, *args)

    def _weights(self, relative: str) -> Path:
        return self.dir / relative / "model.safetensors"

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        found = sorted((self.dir / "checkpoints").glob("step-*"))
        for d in found[:-keep]:
            if d.name != Path(self.state.serving).name and d.name != "step-000000":
                shutil.rmtree(d, ignore_errors=True)

    # -- guards --------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, rows) -> tuple[float, float, float]:
        """Mean KL(candidate || reference), the candidate's and the reference's mean token
        entropy, over the trained tokens of ``rows`` (full distributions at the trainer's
        temperature)."""
        c = self.config
        self.model.eval()
        kl = ent = ref_ent = count = 0.0
        try:
            for i in range(0, len(rows), c.micro_batch_size):
                batch = collate(rows[i:i + c.micro_batch_size], self.pad_id, self.device)
                logp = _log_softmax(self.model, batch, c.temperature)
                ref = _log_softmax(self.ref, batch, c.temperature)
                m = batch.mask.bool()
                p = logp[m].exp()
                kl += (p * (logp[m] - ref[m])).sum().item()
                ent -= (p * logp[m]).sum().item()
                ref_ent -= (ref[m].exp() * ref[m]).sum().item()
                count += m.sum().item()
        finally:
            self.model.train()
        count = max(count, 1.0)
        return kl / count, ent / count, ref_ent / count

    def gate(self, version: str) -> float:
        """Greedy pass@1 of the current (candidate) weights on the gate set; the serving
        model's is measured first if unknown."""
        from e3rl.engine import LLM

        from .datasets import load_problems
        from .evaluate import EvalSettings, evaluate_in_process

        c = self.config
        settings = EvalSettings(n=1, temperature=0.0, seed=0, max_tokens=c.gate_max_tokens)
        if self.gate_llm is None:
            self.gate_problems = load_problems(c.gate_data, limit=c.gate_problems)
            self.gate_llm = LLM(str(self.dir / self.state.serving), dtype=c.dtype,
                                device=str(self.device), kv_cache_memory_gb=0.25,
                                num_threads=c.num_threads or None)
        if self.state.gate_serving is None:
            self.state.gate_serving = evaluate_in_process(
                self.gate_llm, self.gate_problems, settings, analyze_steps=False, progress=False
            ).report()["pass@1"]
        self.gate_llm.update_weights(self.model.state_dict(), version)
        score = evaluate_in_process(self.gate_llm, self.gate_problems, settings,
                                    analyze_steps=False, progress=False).report()["pass@1"]
        self.metrics.gate.labels("candidate").set(score)
        self.metrics.gate.labels("serving").set(self.state.gate_serving)
        return score


def _log_softmax(model, batch, temperature: float) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def _number(version: str | None) -> float:
    try:
        return float(version)
    except (TypeError, ValueError):
        return -1.0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def follow(config: FollowConfig, admin_key: str) -> FollowState:
    """Run ``e3rl train follow`` until ``max_updates`` or SIGTERM / SIGINT."""
    follower = Follower(config, admin_key)

    def stop(signum, _frame) -> None:
        logger.info("signal %d: stopping after the current poll", signum)
        follower.stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    return follower.run()
