"""Trajectory records: one JSON-serialisable dict per finished sample, as the trainer reads it.

A record carries everything the E3RL trainer needs (DESIGN.md, "Trainer"): the token ids, the
per-token log-probs (for importance ratios against the logged policy), NLL and entropy (for
segment scores), the accepted segments with their scores and thresholds (segment-level
advantage allocation), every erasure with the erased attempt and its accepted replacement
(erasure pairs), the sampling and healing parameters, and the weight version(s) that
generated each token (staleness). The store (``trajectory_store.py``) keeps records as JSON;
``RECORD_VERSION`` rises when a field changes meaning, so old rows stay readable.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the store and its tests stay importable without torch
    from e3rl.engine import RequestOutput, SamplingParams

RECORD_VERSION = 1


def trajectory_id(request_id: str, index: int) -> str:
    """The unique id of sample ``index`` of a request (the key of idempotent inserts)."""
    return f"{request_id}:{index}"


def trajectory_records(request_output: RequestOutput, params: SamplingParams, model_name: str,
                       *, created_at: float | None = None) -> list[dict[str, Any]]:
    """One record per sample of a *finished* request (``merge_delta``'s final output, or the
    last ``RequestOutput`` of a non-streamed request). ``created_at`` is Unix time (default:
    now); ``timings`` holds the request's durations in seconds (queue, first token, end to
    end). Aborted samples are built too (``finish_reason == "abort"``): the caller chooses
    whether to store them."""
    if not request_output.finished:
        raise ValueError(f"request {request_output.request_id!r} is not finished")
    created_at = time.time() if created_at is None else created_at
    sampling = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
                if f.name != "healing"}
    healing = _healing_dict(params.healing)
    # "arrival_time" is a monotonic clock reading, meaningless outside this process.
    timings = {k: v for k, v in request_output.metrics.items() if k.endswith("_s")}
    return [{
        "record_version": RECORD_VERSION,
        "id": trajectory_id(request_output.request_id, out.index),
        "request_id": request_output.request_id,
        "index": out.index,
        "n": params.n,
        "created_at": created_at,
        "model": model_name,
        "weight_version": _last_version(out.weight_versions, request_output.weight_version),
        "weight_versions": [[pos, version] for pos, version in out.weight_versions],
        "prompt": request_output.prompt,
        "prompt_token_ids": list(request_output.prompt_token_ids),
        "text": out.text,
        "output_token_ids": list(out.token_ids),
        "logprobs": list(out.logprobs),
        "nll": list(out.nll),
        "entropy": list(out.entropy),
        "segments": [dataclasses.asdict(s) for s in out.segments],
        "erasures": [dataclasses.asdict(e) for e in out.erasures],
        "num_erasures": len(out.erasures),
        "num_output_tokens": len(out.token_ids),
        "num_computed_tokens": out.num_computed_tokens,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
        "sampling_params": sampling,
        "healing_params": healing,
        "timings": timings,
    } for out in request_output.outputs]


def _last_version(weight_versions: list[tuple[int, str]], fallback: str) -> str:
    """The version that generated the sample's last tokens (its only one unless the weights
    were swapped mid-sample)."""
    return weight_versions[-1][1] if weight_versions else fallback


def _healing_dict(healing: Any) -> dict[str, Any] | None:
    if healing is None:
        return None
    if dataclasses.is_dataclass(healing):
        return dataclasses.asdict(healing)
    return dict(healing)
