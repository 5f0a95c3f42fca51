"""The offline API, shaped like vLLM's: ``LLM(model_path, **options).generate(prompts, params)``."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence as Seq

from tqdm.auto import tqdm

from .config import EngineConfig
from .errors import InvalidRequest
from .llm_engine import LLMEngine
from .outputs import RequestOutput, merge_delta
from .sampling_params import SamplingParams


class LLM:
    """Generate completions in-process.

    >>> llm = LLM("models/arith-chain", dtype="float32")
    >>> out = llm.generate(["12+34="], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str, **engine_options: Any):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise InvalidRequest(f"unknown engine option(s) {unknown}", param=unknown[0])
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 params: SamplingParams | dict | Seq[SamplingParams | dict] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in order. ``prompts``: a string, a list of token
        ids, or a list of either. ``params``: one ``SamplingParams`` (or dict of options) for
        all, or one per prompt. Bad input raises ``InvalidRequest`` before anything runs."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, (SamplingParams, dict)):
            params = [params] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise InvalidRequest(f"{len(params)} sampling params for {len(prompts)} prompts",
                                 param="params")
        params = [SamplingParams.from_dict(p) if isinstance(p, dict) else p for p in params]
        # Validate everything first, so a bad prompt leaves nothing half-submitted.
        for prompt, p in zip(prompts, params):
            _, ids = self.engine.tokenize(prompt)
            self.engine.check_lengths(len(ids), p)
        request_ids = []
        for prompt, p in zip(prompts, params):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, p)
            request_ids.append(request_id)
        results: dict[str, RequestOutput] = {}
        show = use_tqdm if use_tqdm is not None else len(prompts) >= 16
        with tqdm(total=len(prompts), desc="generate", disable=not show) as bar:
            try:
                while self.engine.has_unfinished_requests():
                    for delta in self.engine.step():
                        results[delta.request_id] = merge_delta(results.get(delta.request_id),
                                                                delta)
                        if delta.finished:
                            bar.update(1)
            except BaseException:
                for request_id in request_ids:
                    self.engine.abort(request_id)
                raise
        return [results[r] for r in request_ids]

    def update_weights(self, source, version: str) -> None:
        """Swap weights: ``source`` is a directory of safetensors files, a dict, or an
        iterable of ``(name, tensor)``. Raises ``WeightUpdateError`` and changes nothing if
        any tensor's name, shape or dtype does not match the model."""
        self.engine.update_weights(source, version)

    @property
    def weight_version(self) -> str:
        return self.engine.weight_version
