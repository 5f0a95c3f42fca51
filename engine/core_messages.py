"""The messages between a front end and its engine-core process (``core.py``,
``core_client.py``): msgspec structs, msgpack-encoded, one ZeroMQ message each. Only these
types cross; nothing is pickled."""

from __future__ import annotations

import msgspec

from .limits import RequestLimits
from .llm_engine import EngineStats
from .outputs import RequestOutput
from .sampling_params import SamplingParams


# -- front end -> core -------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_id: str


class UpdateWeights(msgspec.Struct, tag="update_weights", array_like=True):
    call_id: int
    path: str  # a directory of safetensors or one safetensors file, readable by the core
    version: str


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


Command = AddRequest | Abort | UpdateWeights | Shutdown


# -- core -> front end -------------------------------------------------------------------
class Ready(msgspec.Struct, tag="ready"):
    limits: RequestLimits
    stats: EngineStats
    num_checkpoint_bytes: int


class StartupFailed(msgspec.Struct, tag="startup_failed"):
    message: str


class RequestError(msgspec.Struct, array_like=True):
    request_id: str
    kind: str  # "invalid_request" | "queue_full" | "step_failed"
    message: str
    param: str | None = None


class StepOutputs(msgspec.Struct, tag="outputs"):
    # Deltas without their prompt (``prompt`` None, ``prompt_token_ids`` empty): the front
    # end has both and puts them back, so a long prompt never crosses again every step.
    outputs: list[RequestOutput]
    errors: list[RequestError]
    stats: EngineStats
    num_taken_in: int  # AddRequests the core has taken in, since it started


class CallResult(msgspec.Struct, tag="result"):
    call_id: int
    stats: EngineStats
    error: str | None = None  # a WeightUpdateError's message
    num_tensors: int = 0
    load_s: float = 0.0
    swap_s: float = 0.0


class CoreDead(msgspec.Struct, tag="dead"):
    message: str


Event = Ready | StartupFailed | StepOutputs | CallResult | CoreDead
