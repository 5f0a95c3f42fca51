"""CPU fast paths: the native greedy-sampling kernel, the one-pass RMSNorm kernel, and the
bf16 runner's prepacked linear weights (refreshed after weight updates)."""

import zlib

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from e3rl.engine import LLM, SamplingParams, cpu_model, kernels
from e3rl.engine.model_factory import TINY_CONFIGS, build_random_model
from e3rl.engine.sampler import SamplingBatch, sample


@pytest.fixture(scope="module", autouse=True)
def built():
    kernels.load_cpu_kernels()
    assert kernels.loaded()


# -- greedy sampling -------------------------------------------------------------------------

def _special_logits(vocab: int, seed: int) -> torch.Tensor:
    """Random rows plus: -inf entries, ties (first max must win, also across the vector tail),
    a max in the tail past the last full vector, a peaked row and a flat row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, vocab, generator=g) * 3
    logits[1, ::3] = float("-inf")  # -inf entries, max finite
    logits[2, :] = torch.randn(vocab, generator=g)
    top = float(logits[2].max()) + 1.0
    logits[2, vocab // 2] = top  # tie: torch.argmax picks the first
    logits[2, vocab - 1] = top
    logits[2, 1 % vocab] = top
    logits[3, vocab - 1] = float(logits[3].max()) + 2.0  # max at the very end (scalar tail)
    logits[4] *= 40  # near one-hot: tiny entropy, log-prob close to 0
    logits[5] = 0.25  # all equal: argmax 0, entropy log(V)
    logits[6, 1:] = float("-inf")  # a single finite entry: entropy 0, log-prob 0
    logits[7, 0] = float("-inf")  # -inf at the position argmax scanning starts from
    return logits


def _reference(logits: torch.Tensor):
    """In float64: torch's float32 log_softmax/sum here was seen to return a value 2e-4 off on
    the first call of a session (then correct), which made a float32 reference flaky."""
    logp = logits.double().log_softmax(-1)
    p = logp.exp()
    ids = logits.argmax(-1)
    lp = logp.gather(1, ids.unsqueeze(1)).squeeze(1)
    ent = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    return ids, lp.float(), ent.float()


@pytest.mark.parametrize("vocab", [1003, 1024, 7, 1])
def test_greedy_kernel_matches_torch(vocab):
    logits = _special_logits(vocab, seed=vocab) if vocab > 1 else torch.randn(3, 1)
    ids, lp, ent = kernels.greedy_sample(logits)
    ref_ids, ref_lp, ref_ent = _reference(logits)
    assert ids.dtype == torch.long and lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert ids.tolist() == ref_ids.tolist()
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    if vocab > 2:
        assert ids[2] == 1  # first of the tied maxima
        assert ids[3] == vocab - 1
        assert ids[5] == 0 and ent[5] == pytest.approx(torch.log(torch.tensor(vocab)).item(),
                                                      abs=1e-5)
        assert ids[6] == 0 and lp[6] == 0 and ent[6] == 0


def _greedy_batch(n: int, banned=None, max_num_logprobs: int = 0) -> SamplingBatch:
    return SamplingBatch(torch.zeros(n), torch.zeros(n, dtype=torch.long), torch.ones(n),
                         torch.zeros(n), [None] * n, banned or [[]] * n,
                         max_num_logprobs=max_num_logprobs)


def test_sample_all_greedy_uses_kernel_and_equals_torch_path(monkeypatch):
    logits = _special_logits(1003, seed=7)
    # Ban the argmax of row 0: banning must still apply before the kernel runs.
    banned = [[int(logits[0].argmax())], [], [5, 6], [], [], [], [], []]
    calls = []
    real = kernels.greedy_sample
    monkeypatch.setattr(kernels, "greedy_sample", lambda x: calls.append(x.shape) or real(x))
    fast = sample(logits.clone(), _greedy_batch(8, banned))
    assert calls == [(8, 1003)]
    monkeypatch.setattr(kernels, "loaded", lambda: False)
    slow = sample(logits.clone(), _greedy_batch(8, banned))
    assert len(calls) == 1  # the torch path did not call the kernel
    assert fast.token_ids.tolist() == slow.token_ids.tolist()
    assert fast.token_ids[0] != logits[0].argmax()
    for name in ("logprobs", "nll", "entropy"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), atol=1e-5, rtol=0)
    assert fast.top_ids is None and fast.top_logprobs is None


def test_sample_with_top_logprobs_or_random_rows_keeps_torch_path(monkeypatch):
    monkeypatch.setattr(kernels, "greedy_sample",
                        lambda x: pytest.fail("the kernel must not run here"))
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits.clone(), _greedy_batch(3, max_num_logprobs=2))
    assert out.top_ids.shape == (3, 2)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    batch = _greedy_batch(3)
    batch.temperatures[1] = 1.0
    batch.generators[1] = torch.Generator().manual_seed(1)
    assert sample(logits.clone(), batch).token_ids[0] == logits[0].argmax()


# -- RMSNorm ---------------------------------------------------------------------------------

NORM_CLASSES = [Qwen3RMSNorm, LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm]


def _norm(cls, hidden, dtype, seed, eps=1e-6):
    g = torch.Generator().manual_seed(seed)
    module = cls(hidden, eps=eps)
    with torch.no_grad():
        module.weight.copy_(torch.randn(hidden, generator=g) * 0.5 + 1)
    return module.to(dtype).eval()


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)


@pytest.mark.parametrize("cls", NORM_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(5, 768), (7, 3, 64), (2, 100), (3, 7, 64, "permuted"), (1, 3)])
def test_rms_norm_kernel_matches_transformers(cls, dtype, shape):
    seed = zlib.crc32(repr((cls.__name__, str(dtype), shape)).encode()) % 10_000
    if shape[-1] == "permuted":  # a non-contiguous input
        x = _inputs(shape[:3], dtype, seed).permute(1, 0, 2)
        assert not x.is_contiguous()
    else:
        x = _inputs(shape, dtype, seed)
    module = _norm(cls, x.shape[-1], dtype, seed, eps=1e-5 if cls is LlamaRMSNorm else 1e-6)
    with torch.no_grad():
        expected = module(x)
    got = torch.ops.e3rl.rms_norm(x, module.weight, module.variance_epsilon)
    assert got.shape == expected.shape and got.dtype == expected.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        differ = got != expected
        assert int(differ.sum()) * 1000 <= x.numel(), f"{int(differ.sum())} of {x.numel()} differ"
        torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=1e-2)


class LlamaRMSNormLookalike(nn.Module):
    """Gemma-style numerics (1 + weight) under a listed class name: must not be fused."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden) * 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


LlamaRMSNormLookalike.__name__ = "LlamaRMSNorm"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_optimize_fuses_listed_rms_norms_only(dtype):
    assert {cls.__name__ for cls in NORM_CLASSES} <= cpu_model.RMS_NORM_CLASSES
    assert "GemmaRMSNorm" not in cpu_model.RMS_NORM_CLASSES
    listed = {cls.__name__: _norm(cls, 64, dtype, seed=i) for i, cls in enumerate(NORM_CLASSES)}
    gemma = GemmaRMSNorm(64).to(dtype)
    with torch.no_grad():
        gemma.weight.normal_()
    lookalike = LlamaRMSNormLookalike(64).to(dtype)
    tree = nn.ModuleDict({"inner": nn.ModuleDict(listed), "gemma": gemma,
                          "lookalike": lookalike, "linear": nn.Linear(64, 64).to(dtype)})
    x = _inputs((6, 64), dtype, seed=3)
    leaves = {name: m for name, m in tree.named_modules() if not isinstance(m, nn.ModuleDict)}
    with torch.no_grad():
        before = {name: m(x) for name, m in leaves.items()}

    paths = cpu_model.optimize(tree)
    assert paths.fused_norms == 4 and paths.packed_linears + paths.tiled_linears == 1
    # e3rl's product where the CPU has it for this dtype; oneDNN's packed weight otherwise
    tiled = kernels.gemm_available(dtype)
    assert paths.tiled_linears == int(tiled)
    for module in listed.values():
        assert "forward" in module.__dict__
        assert module.forward.__func__ is cpu_model._fused_rms_norm_forward
        with torch.no_grad():
            out = module(x)
        assert torch.equal(out, torch.ops.e3rl.rms_norm(x, module.weight, module.variance_epsilon))
    for skipped in (gemma, lookalike):
        assert "forward" not in skipped.__dict__
    assert hasattr(tree["linear"], "e3rl_tiled_weight" if tiled else "e3rl_packed_weight")
    with torch.no_grad():
        after = {name: m(x) for name, m in leaves.items()}
    for name in ("gemma", "lookalike"):
        assert torch.equal(after[name], before[name])
    linear_tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(after["linear"].float(), before["linear"].float(),
                               atol=linear_tol, rtol=linear_tol)
    for name in listed:
        tol = {"atol": 0, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(after[f"inner.{name}"].float(),
                                   before[f"inner.{name}"].float(), **tol)
    assert cpu_model.optimize(tree) == cpu_model.FastPaths()  # done; lookalike still refused


# -- the bf16 runner: prepacked linears, fused norms, refreshed after weight updates ---------

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44], [20, 21, 22, 23, 24, 25, 26, 27, 28], [60]]


def _greedy_ids(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bf16_update_weights_refreshes_packed_linears(tmp_path, tied):
    config = {**TINY_CONFIGS["qwen3"], "tie_word_embeddings": tied}
    first = build_random_model(tmp_path / "first", config, seed=1, dtype=torch.bfloat16)
    second = build_random_model(tmp_path / "second", config, seed=2, dtype=torch.bfloat16)

    llm = LLM(first, dtype="bfloat16", num_kv_blocks=64)
    runner = llm.engine.runner
    linears = [m for m in runner.model.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in runner.model.modules()
             if type(m).__name__ in cpu_model.RMS_NORM_CLASSES]
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head; 2 x (in, post, q_norm, k_norm) + final
    paths = runner.fast_paths
    assert paths.packed_linears + paths.tiled_linears == len(linears) == 15
    # the tiny vocabulary is no multiple of 16: lm_head keeps oneDNN's packed weight
    assert runner.vocab_size % 16 != 0
    assert paths.tiled_linears == (14 if kernels.gemm_available() else 0)
    assert paths.fused_norms == len(norms) == 9
    # each MLP's gate and up read one tiled weight, tiles alternating (no second copy)
    assert paths.fused_gate_up == (2 if kernels.gemm_available() else 0)
    for layer in runner.model.model.layers:
        mlp = layer.mlp
        if paths.fused_gate_up:
            assert mlp.gate_proj.e3rl_tiled_weight is mlp.up_proj.e3rl_tiled_weight \
                is mlp.e3rl_gate_up
            assert (mlp.gate_proj.e3rl_tiles, mlp.up_proj.e3rl_tiles) == ((0, 2), (1, 2))
    assert all("forward" in m.__dict__ for m in linears)
    for m in linears:
        tiled = kernels.gemm_available() and m.out_features % 16 == 0
        assert hasattr(m, "e3rl_tiled_weight" if tiled else "e3rl_packed_weight")
    assert all(m.forward.__func__ is cpu_model._fused_rms_norm_forward for m in norms)

    before = _greedy_ids(llm)
    llm.update_weights(second, "v2")
    after = _greedy_ids(llm)
    reference = _greedy_ids(LLM(second, dtype="bfloat16", num_kv_blocks=64))
    assert after == reference
    assert after != before

    # Each derived copy now holds the new weight: the layer's output is the plain product.
    x = torch.randn(3, linears[0].in_features, dtype=torch.bfloat16)
    for m in linears:
        x_m = x if m.in_features == x.shape[-1] else torch.randn(3, m.in_features,
                                                                  dtype=torch.bfloat16)
        with torch.no_grad():
            got = m(x_m)
            want = torch.nn.functional.linear(x_m.float(), m.weight.float(),
                                              None if m.bias is None else m.bias.float())
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_float32_takes_only_the_tiled_products(tiny_model):
    runner = LLM(tiny_model, dtype="float32", num_kv_blocks=16).engine.runner
    assert runner.dtype == torch.float32
    linears = [m for m in runner.model.modules() if isinstance(m, nn.Linear)]
    tiled = [m for m in linears if kernels.gemm_available(torch.float32)
             and m.out_features % 16 == 0]
    assert runner.fast_paths == cpu_model.FastPaths(tiled_linears=len(tiled))
    switched = [m for m in runner.model.modules() if "forward" in m.__dict__]
    assert switched == tiled  # no packed copies, no fused norms: transformers' arithmetic
    assert runner.model_impl == "transformers"


def test_greedy_kernel_picks_the_first_nan_like_torch_argmax():
    x = torch.randn(3, 1003)
    x[0, 10] = float("nan")
    x[1, 1001] = float("nan")
    x[2, 5] = x[2, 7] = float("nan")
    ids, _, _ = kernels.greedy_sample(x)
    assert ids.tolist() == x.argmax(-1).tolist() == [10, 1001, 5]


def test_fusing_norms_leaves_the_global_rng_alone():
    tree = torch.nn.ModuleList([LlamaRMSNorm(32).to(torch.bfloat16)])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert cpu_model.optimize(tree).fused_norms == 1
    assert torch.equal(torch.rand(3), expected)


def test_float32_update_weights_refreshes_tiled_linears(tmp_path):
    first = build_random_model(tmp_path / "first", TINY_CONFIGS["qwen3"], seed=1)
    second = build_random_model(tmp_path / "second", TINY_CONFIGS["qwen3"], seed=2)
    llm = LLM(first, dtype="float32", num_kv_blocks=64)
    before = _greedy_ids(llm)
    llm.update_weights(second, "v2")
    assert _greedy_ids(llm) == _greedy_ids(LLM(second, dtype="float32", num_kv_blocks=64))
    assert _greedy_ids(llm) != before
    for m in llm.engine.runner.model.modules():
        if hasattr(m, "e3rl_tiled_weight"):  # each tiled copy holds the new weight
            x = torch.randn(3, m.in_features)
            with torch.no_grad():
                torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias),
                                           atol=1e-5, rtol=1e-5)
