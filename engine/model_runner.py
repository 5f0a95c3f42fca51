"""Loads a Hugging Face causal LM from a local directory and runs the packed forward pass."""

from __future__ import annotations

import ctypes
import logging
import platform
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from . import attention, cpu_model, kernels, native_model
from .attention import AttentionMetadata, DecodeGroup, NativeDecode, PrefillChunk
from .config import EngineConfig
from .errors import ModelNotSupported
from .kv_cache import KVCache
from .scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class ModelRunnerOutput:
    """Logits of the rows the engine asked for, float32 ``[R, V]``, and where each
    scheduled sequence's rows are: ``sample_rows[i]`` is the row to sample for
    ``scheduled[i]`` (or -1), ``prompt_rows[i]`` the first of its prompt-logprob rows."""

    logits: torch.Tensor
    sample_rows: list[int]
    prompt_rows: list[tuple[int, int, int, int]]  # (scheduled index, first row, rows, position)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return device


def tune_cpu_allocator() -> bool:
    """Keep glibc malloc from returning large blocks to the OS after every free.

    By default glibc serves blocks above a (dynamic) threshold with mmap and unmaps them on
    free, so each step's multi-MB activations are page-faulted in again: on CPU that made
    elementwise ops 3-5x slower and prefill ~1.5x slower. Raising the mmap threshold to 32 MiB
    (glibc's maximum) and the trim threshold to 1 GiB lets freed activations be reused.
    Process-wide; a no-op (False) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """``native`` or ``sdpa`` (see ``EngineConfig.attention_backend``)."""
    if name == "sdpa" or (name == "auto" and device.type != "cpu"):
        return "sdpa"
    if device.type != "cpu":
        raise ValueError(f"attention_backend native runs on CPU only, not on {device}")
    try:
        kernels.load_cpu_kernels()
    except kernels.KernelBuildError as exc:
        if name == "native":
            raise
        logger.warning("%s; decode attention falls back to SDPA over gathered blocks, which "
                       "is slower (install a C++ compiler, or set attention_backend=sdpa to "
                       "choose it explicitly)", exc)
        return "sdpa"
    return "native"


def _check_supported(hf_config) -> None:
    """Refuse, with a clear message, what paged full attention cannot serve correctly."""
    name = type(hf_config).__name__
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ModelNotSupported(f"{name}: encoder-decoder models are not supported")
    layer_types = getattr(hf_config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise ModelNotSupported(f"{name}: layer types {other} are not supported "
                                "(only full attention; sliding-window, linear or hybrid layers "
                                "would be served wrongly)")
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, attr, None):
            raise ModelNotSupported(f"{name}: {attr} is not supported by paged attention")


class ModelRunner:
    """The model, its KV pool, and one ``execute`` per engine step."""

    def __init__(self, config: EngineConfig):
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(config.model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no model directory at {path} (config.json missing); "
                                    "models load from local directories only")
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and tune_cpu_allocator():
            logger.info("glibc malloc tuned for reuse of large blocks (mmap threshold 32 MiB, "
                        "trim threshold 1 GiB)")
        self.attention_backend = resolve_attention_backend(config.attention_backend,
                                                           self.device)
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True,
                                               trust_remote_code=False)
        hf_config = getattr(hf_config, "text_config", None) or hf_config
        _check_supported(hf_config)
        self.dtype = self._pick_dtype(config.dtype, hf_config)
        max_len = getattr(hf_config, "max_position_embeddings", None) or 2048
        window = getattr(hf_config, "sliding_window", None)
        if window:  # full attention equals sliding-window attention within the window
            if max_len > window:
                logger.info("%s: sliding window %d: context capped at %d tokens",
                            config.model, window, window)
            max_len = min(max_len, window)
        if config.max_model_len is not None:
            if config.max_model_len > max_len:
                raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                                 f"context length {max_len}")
            max_len = config.max_model_len
        self.max_model_len = max_len
        attention.register()
        self.model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, dtype=self.dtype,
            attn_implementation=attention.ATTN_IMPLEMENTATION, use_safetensors=True,
        ).to(self.device).eval()
        self.hf_config = self.model.config
        self.fast_paths = self._optimize_for_cpu()
        if self.fast_paths.packed_linears or self.fast_paths.tiled_linears:
            logger.info("CPU bf16 fast paths: %s", self.fast_paths)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        num_layers = hf_config.num_hidden_layers
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        block_size = config.block_size
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            per_block = KVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim,
                                                self.dtype)
            num_blocks = int(config.kv_cache_memory_gb * (1 << 30)) // per_block
        if num_blocks < 1:
            raise ValueError("the KV memory budget is smaller than one block")
        self.kv_cache = KVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                                self.dtype, self.device)
        logger.info("loaded %s (%s, %s on %s): %d KV blocks of %d tokens (%.1f MiB), "
                    "%s decode attention", path, type(self.model).__name__, self.dtype,
                    self.device, num_blocks, block_size, self.kv_cache.nbytes / 2**20,
                    self.attention_backend)
        self._check_attention_routing(num_layers)
        # Prompt tokens through the native kernel too in bf16/fp16 (~1.5x SDPA's flash kernel
        # there); float32 keeps SDPA for prompts, whose numerics float32 runs compare against
        # (a 2-rank training run equals a 1-rank run to 1e-6 only with it).
        self.native_prefill = self.dtype != torch.float32
        self.native_forward = self._native_forward(config.model_impl)
        self.model_impl = "e3rl" if self.native_forward is not None else "transformers"

    def _optimize_for_cpu(self) -> cpu_model.FastPaths:
        """On CPU: bf16 takes every fast path of ``cpu_model`` (tiled or prepacked linears,
        fused norms); float32 only the tiled products, whose sums differ from MKL's in order
        alone, so greedy outputs stay token-identical to transformers'. fp16 keeps torch's."""
        if self.device.type != "cpu":
            return cpu_model.FastPaths()
        if self.dtype == torch.bfloat16:
            return cpu_model.optimize(self.model)
        if self.dtype == torch.float32:
            return cpu_model.optimize(self.model, pack_linears=False, fuse_norms=False)
        return cpu_model.FastPaths()

    def _native_forward(self, model_impl: str) -> native_model.NativeForward | None:
        """e3rl's own forward when ``model_impl`` asks for it and it applies (checked against
        transformers' forward on a random prompt); None for transformers' forward."""
        if model_impl == "transformers":
            return None
        try:
            if self.device.type != "cpu" or self.dtype != torch.bfloat16:
                raise native_model.NotSupported(f"it runs on CPU in bfloat16, not on "
                                                f"{self.device.type} in {self.dtype}")
            forward = native_model.NativeForward(self.model)
            self._check_native_forward(forward)
        except native_model.NotSupported as exc:
            if model_impl == "e3rl":
                raise ModelNotSupported(f"model_impl e3rl: {exc}") from None
            log = logger.warning if isinstance(exc, native_model.Mismatch) else logger.info
            log("transformers' forward (e3rl's own does not apply: %s)", exc)
            return None
        logger.info("e3rl's own forward of %s", type(self.model).__name__)
        return forward

    def _check_native_forward(self, forward: native_model.NativeForward) -> None:
        """Logits of a random 8-token prompt from both forwards must agree to bf16 precision
        (a model whose modules look like the family's but compute something else is refused).
        Writes K/V into the first block of the pool, which holds nothing yet."""
        n = min(8, self.kv_cache.num_blocks * self.kv_cache.block_size)
        generator = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (n,), generator=generator).to(self.device)
        pos = torch.arange(n, device=self.device)
        keep = torch.arange(n, device=self.device)
        results = []
        for native in (False, True):
            meta = AttentionMetadata(kv_cache=self.kv_cache, slot_mapping=pos,
                                     prefills=[PrefillChunk(0, n, 0)])
            with torch.inference_mode():
                if native:
                    try:
                        logits = forward(ids, pos, keep, meta)
                    except RuntimeError as exc:  # a shape the native passes refuse
                        raise native_model.Mismatch(f"it failed: {exc}") from exc
                else:
                    logits = self.model(input_ids=ids.view(1, n), position_ids=pos.view(1, n),
                                        use_cache=False, logits_to_keep=keep,
                                        **{attention.METADATA_KWARG: meta}).logits[0]
            results.append(logits.float())
        ref, got = results
        err = (got - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        if not err <= 0.03 * scale:  # bf16 rounding differences stay far below this
            raise native_model.Mismatch(f"its logits differ from transformers' by {err:.3g} "
                                        f"(scale {scale:.3g})")

    def weights_changed(self) -> None:
        """The model's parameters were written in place: refresh derived copies."""
        cpu_model.refresh(self.model)

    @staticmethod
    def _pick_dtype(name: str, hf_config) -> torch.dtype:
        if name != "auto":
            return _DTYPES[name]
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = _DTYPES.get(dtype, torch.float32)
        return dtype if dtype in _DTYPES.values() else torch.float32

    def _check_attention_routing(self, num_layers: int) -> None:
        """Every layer must attend through the paged function, else the model's attention
        bypasses the engine's cache and would be served wrongly."""
        meta = AttentionMetadata(kv_cache=self.kv_cache,
                                 slot_mapping=torch.tensor([0, 1], device=self.device),
                                 prefills=[PrefillChunk(0, 2, 0)])
        with torch.inference_mode():
            self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device),
                       position_ids=torch.arange(2, device=self.device).unsqueeze(0),
                       use_cache=False, logits_to_keep=1,
                       **{attention.METADATA_KWARG: meta})
        if meta.num_calls != num_layers:
            raise ModelNotSupported(
                f"{type(self.model).__name__}: {meta.num_calls} of {num_layers} layers use "
                "transformers' attention interface; the engine cannot serve this model")

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.kv_cache.copy_blocks(sched.block_copies)
        bs = self.kv_cache.block_size
        scheduled = sched.scheduled
        # Decode tokens first, shortest context first (for grouping), then prefill chunks.
        keys = [(item.num_new_tokens != 1, item.seq.num_computed_tokens) for item in scheduled]
        order = sorted(range(len(scheduled)), key=keys.__getitem__)
        native = self.attention_backend == "native"
        native_prefill = native and self.native_prefill
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []  # packed positions whose logits we need
        sample_rows = [-1] * len(scheduled)
        prompt_rows: list[tuple[int, int, int, int]] = []
        decode_tables: list[list[int]] = []  # decode sequences' tables (native: every one's)
        decode_lens: list[int] = []  # their context lengths (native: every token's)
        row_tables = array("q")  # native: which table each token reads
        prefills: list[PrefillChunk] = []
        for i in order:
            item = scheduled[i]
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            offset = len(input_ids)
            table = seq.block_table
            if n == 1:  # decode: one token, the common case, without slices and ranges
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                row_tables.append(len(decode_tables))
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                input_ids += seq.token_ids[start:start + n]
                positions += range(start, start + n)
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
                if native_prefill:  # the kernel attends each prompt token over its context
                    row_tables.extend([len(decode_tables)] * n)
                    decode_tables.append(table[:-(-(start + n) // bs)])
                    decode_lens += range(start + 1, start + n + 1)
                else:
                    prefills.append(self._prefill_chunk(offset, n, start, table))
            # Prompt log-probs: logits at prompt positions p predict token p + 1.
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                last = min(start + n, seq.num_prompt_tokens - 1)
                prompt_rows.append((i, len(keep), last - start, start))
                keep += range(offset, offset + last - start)
            if item.samples:
                sample_rows[i] = len(keep)
                keep.append(offset + n - 1)
        num_tokens = len(input_ids)
        tables = _padded(decode_tables)
        ids, pos, slot_t, keep_t, lens_t, tables_t, rows_t = self._long_tensors(
            input_ids, positions, slots, keep, decode_lens, tables, row_tables)
        meta = AttentionMetadata(kv_cache=self.kv_cache, slot_mapping=slot_t,
                                 prefills=prefills)
        if decode_tables:
            tables_t = tables_t.view(len(decode_tables), -1)  # [n, max_blocks]
            if native:
                has_prefill = len(decode_lens) > len(decode_tables)
                meta.native_decode = NativeDecode(0, len(decode_lens), tables_t, lens_t,
                                                  rows_t if has_prefill else None)
            else:
                meta.decodes = self._decode_groups(decode_tables, tables_t, decode_lens)
        if self.native_forward is not None:
            logits = self.native_forward(ids, pos, keep_t, meta)
        else:
            logits = self.model(input_ids=ids.view(1, num_tokens),
                                position_ids=pos.view(1, num_tokens), use_cache=False,
                                logits_to_keep=keep_t, **{attention.METADATA_KWARG: meta}).logits[0]
        return ModelRunnerOutput(logits.float(), sample_rows, prompt_rows)

    def _long_tensors(self, *parts: list[int]) -> list[torch.Tensor]:
        """1-D int64 tensors of ``parts`` on the device, all views of one buffer: one
        conversion (``array`` -> ``frombuffer``, ~5x faster than ``torch.tensor(list)``) and,
        off CPU, one host-to-device copy per step instead of one per input."""
        flat = array("q")
        for part in parts:
            flat.extend(part)
        if not flat:
            whole = torch.empty(0, dtype=torch.long, device=self.device)
        else:
            whole = torch.frombuffer(flat, dtype=torch.long)
            if self.device.type != "cpu":
                whole = whole.to(self.device, non_blocking=True)
        views, start = [], 0
        for part in parts:
            views.append(whole[start:start + len(part)])
            start += len(part)
        return views

    def _decode_groups(self, tables: list[list[int]], tables_t: torch.Tensor,
                       lens: list[int]) -> list[DecodeGroup]:
        """Split decode sequences (sorted by length) into groups whose padded gather stays
        within ~1.5x of their real context, so short sequences do not pay for long ones.
        ``tables_t``: the ``[n, max_blocks]`` padded ``tables``."""
        groups, start = [], 0
        for i in range(1, len(lens) + 1):
            if i == len(lens) or (lens[i] > 1.5 * lens[start] and i - start >= 4):
                width = max(map(len, tables[start:i]))  # the group's own padded width
                group_tables = tables_t[start:i, :width].contiguous()
                groups.append(self._decode_group(start, group_tables, lens[start:i]))
                start = i
        return groups

    def _decode_group(self, start: int, tables: torch.Tensor, lens: list[int]) -> DecodeGroup:
        group = DecodeGroup(start, start + len(lens), tables)
        if all(n == lens[0] for n in lens):
            group.context_len = lens[0]  # equal contexts: slice, no mask
        else:
            width = tables.shape[1] * self.kv_cache.block_size
            lens_t = torch.tensor(lens, device=self.device)
            mask = torch.arange(width, device=self.device).unsqueeze(0) < lens_t.unsqueeze(1)
            group.mask = mask[:, None, None, :]  # [n, 1, 1, L]
        return group

    def _prefill_chunk(self, offset: int, n: int, start: int, table: list[int]) -> PrefillChunk:
        chunk = PrefillChunk(offset, offset + n, start)
        if start > 0:
            bs = self.kv_cache.block_size
            num_blocks = -(-(start + n) // bs)
            chunk.block_table = torch.tensor(table[:num_blocks], dtype=torch.long,
                                             device=self.device)
            q_pos = torch.arange(start, start + n, device=self.device).unsqueeze(1)
            k_pos = torch.arange(start + n, device=self.device).unsqueeze(0)
            chunk.mask = k_pos <= q_pos  # [n, start + n]
        return chunk


def _padded(tables: list[list[int]]) -> list[int]:
    """Block tables as one flat row-major ``[n, max_blocks]`` list, rows padded with block 0
    (never read past a context)."""
    width = max(map(len, tables), default=0)
    flat: list[int] = []
    for table in tables:
        flat += table
        if len(table) < width:
            flat += [0] * (width - len(table))
    return flat
