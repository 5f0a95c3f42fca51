"""Engine configuration, validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to start. Built by ``LLM(...)`` or the server's settings."""

    model: str
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0  # KV pool budget; ignored when num_kv_blocks is set
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64  # running sequences at once
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_model_len: int | None = None  # default: the model's context length
    max_waiting: int = 4096  # bounded waiting queue (requests)
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    seed: int = 0  # seeds the random streams of requests that give no seed
    served_model_name: str | None = None
    # Decode attention: "native" = e3rl's C++ paged kernel (CPU; reads K/V straight from the
    # pool), "sdpa" = torch SDPA over gathered blocks (any device), "auto" = native on CPU
    # when it builds (a warning says why not), sdpa elsewhere.
    attention_backend: str = "auto"
    # The model's forward: "e3rl" = e3rl's own forward of Llama-family models (Llama,
    # Mistral, Qwen2, Qwen3) on CPU in bf16 (``native_model``: fused native passes around
    # prepacked projections; checked against transformers' forward at load), "transformers"
    # = the transformers modules, "auto" = e3rl's where it applies (CPU, bf16, a listed
    # family, native kernels built), transformers' elsewhere.
    model_impl: str = "auto"
    # Automatic prefix caching: full KV blocks are indexed by a hash of their whole prefix
    # (and the weights version); a request reuses the cached blocks of its longest cached
    # prefix and computes only the rest; freed cached blocks stay reusable until evicted
    # (LRU); a weight swap drops the whole index. Off by default: with it on, a hit prompt is
    # prefilled from its first uncached token (the chunked-prefill attention path), whose
    # float rounding differs (~5e-7) from a whole-prompt prefill, and an existing bit-exact
    # test (tests/engine/test_healing.py::test_deltas_never_show_erased_text: the same
    # forced-healing request twice on one engine) then restores another attempt among
    # near-ties. Outputs stay correct (log-probs match a from-scratch forward), not bitwise
    # reproducible across cold and warm cache.
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.attention_backend not in ("auto", "native", "sdpa"):
            raise ValueError("attention_backend must be auto, native or sdpa, not "
                             f"{self.attention_backend!r}")
        if self.model_impl not in ("auto", "e3rl", "transformers"):
            raise ValueError("model_impl must be auto, e3rl or transformers, not "
                             f"{self.model_impl!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.num_kv_blocks is None and self.kv_cache_memory_gb <= 0:
            raise ValueError("kv_cache_memory_gb must be > 0")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
