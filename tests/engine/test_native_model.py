"""e3rl's own forward of Llama-family models (``engine/native_model.py``) and its fused
kernels: each kernel equals transformers' op sequence, the whole forward equals transformers'
forward on mixed prefill/decode steps, unsupported models fall back (or are refused when asked
for explicitly), and weight updates reach it."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from e3rl.engine import LLM, SamplingParams, attention, kernels
from e3rl.engine.config import EngineConfig
from e3rl.engine.errors import ModelNotSupported
from e3rl.engine.model_factory import build_random_model
from e3rl.engine.model_runner import ModelRunner
from e3rl.engine.scheduler import ScheduledSequence, SchedulerOutput
from e3rl.engine.sampling_params import SamplingParams as Params
from e3rl.engine.sequence import Sequence


@pytest.fixture(scope="module", autouse=True)
def built():
    kernels.load_cpu_kernels()


def _bf16(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(torch.bfloat16)


def _hf_rms_norm(x, weight, eps):  # transformers' Llama-family RMSNorm, op for op
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("rows,width", [(1, 64), (37, 768), (5, 100)])
def test_add_rms_norm_equals_add_then_norm(rows, width):
    residual, x, w = _bf16((rows, width), 0), _bf16((rows, width), 1), _bf16((width,), 2)
    expected_sum = residual + x
    expected = _hf_rms_norm(expected_sum, w, 1e-6)
    out = kernels.add_rms_norm_(residual, x, w, 1e-6)
    assert torch.equal(residual, expected_sum)  # the residual is updated in place
    # the sum of squares is ordered differently: at most one bf16 ulp, on few elements
    assert torch.allclose(out.float(), expected.float(), rtol=8e-3, atol=0)
    assert (out != expected).float().mean() < 0.01


@pytest.mark.parametrize("rows,width", [(1, 128), (33, 2048), (3, 70)])
def test_silu_mul_equals_transformers_mlp_middle(rows, width):
    gate, up = _bf16((rows, width), 3), _bf16((rows, width), 4)
    expected = F.silu(gate) * up
    out = kernels.silu_mul(gate, up)
    assert torch.allclose(out.float(), expected.float(), rtol=8e-3, atol=0)
    assert (out != expected).float().mean() < 0.01


def _rope_tables(tokens, d, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 500, (tokens,), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


@pytest.mark.parametrize("with_norm", [True, False], ids=["qwen3-qk-norm", "llama"])
def test_qk_norm_rope_equals_transformers(with_norm):
    tokens, hq, hk, d = 9, 6, 2, 64
    q, k = _bf16((tokens, hq * d), 5), _bf16((tokens, hk * d), 6)
    qw, kw = (_bf16((d,), 7), _bf16((d,), 8)) if with_norm else (None, None)
    cos, sin = _rope_tables(tokens, d, 9)
    q4, k4 = q.view(1, tokens, hq, d), k.view(1, tokens, hk, d)
    if with_norm:
        q4, k4 = _hf_rms_norm(q4, qw, 1e-6), _hf_rms_norm(k4, kw, 1e-6)
    eq, ek = apply_rotary_pos_emb(q4.transpose(1, 2), k4.transpose(1, 2), cos[None], sin[None])
    qv, kv = q.view(tokens, hq, d), k.view(tokens, hk, d)
    kernels.qk_norm_rope_(qv, kv, qw, kw, cos, sin, 1e-6)
    for got, want in ((qv, eq[0].transpose(0, 1)), (kv, ek[0].transpose(0, 1))):
        if with_norm:  # the norm's sum of squares: rare one-ulp differences, then rotated
            assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
            assert (got != want).float().mean() < 0.02
        else:
            assert torch.equal(got, want)


def test_qk_norm_rope_refuses_bad_layouts():
    q, k = _bf16((4, 2, 8), 0), _bf16((4, 1, 8), 1)
    cos, sin = _rope_tables(4, 8, 2)
    with pytest.raises(RuntimeError, match="cos/sin must be"):
        kernels.qk_norm_rope_(q, k, None, None, cos[:3], sin[:3], 1e-6)
    with pytest.raises(RuntimeError, match="heads must be contiguous"):
        kernels.qk_norm_rope_(_bf16((4, 8, 2), 4).transpose(1, 2), k, None, None, cos, sin, 1e-6)
    with pytest.raises(RuntimeError, match="both norm weights or neither"):
        kernels.qk_norm_rope_(q, k, _bf16((8,), 3), None, cos, sin, 1e-6)


def _runner(path, impl, **overrides):
    return ModelRunner(EngineConfig(model=str(path), dtype="bfloat16", num_kv_blocks=64,
                                    model_impl=impl, **overrides))


@pytest.fixture(params=["tiled", "packed"])
def linears(request, monkeypatch):
    """Both of cpu_model's bf16 products: e3rl's tiled kernel (where the CPU has AVX512_BF16)
    and oneDNN's packed weights (forced here, as on CPUs without it)."""
    from e3rl.engine import cpu_model

    if request.param == "tiled" and not kernels.gemm_available():
        pytest.skip("this CPU has no AVX512_BF16")
    if request.param == "packed":
        monkeypatch.setattr(cpu_model, "_tileable", lambda module: False)
    return request.param


def _mixed_step(runner, seed, params=None):
    """Three sequences already holding context (decode) and two new prompts (prefill), one
    of them a second chunk: every attention path of a step."""
    g = torch.Generator().manual_seed(seed)
    bs, vocab = runner.kv_cache.block_size, runner.vocab_size
    items, next_block = [], 1
    for cached, new in ((40, 1), (17, 1), (70, 1), (0, 23), (32, 9)):
        total = cached + new
        ids = torch.randint(4, vocab, (total,), generator=g).tolist()
        seq = Sequence(len(items), f"r{len(items)}", 0, ids, params or Params(max_tokens=4),
                       None, None)
        n_blocks = -(-total // bs)
        seq.block_table = list(range(next_block, next_block + n_blocks))
        next_block += n_blocks
        seq.num_computed_tokens = cached
        items.append(ScheduledSequence(seq, new))
    return SchedulerOutput(items)


def _run_mixed_step(runner, params=None):
    """``_mixed_step`` after a first pass that writes the context it attends over."""
    prefix = _mixed_step(runner, seed=1)
    for item in prefix.scheduled:
        item.num_new_tokens += item.seq.num_computed_tokens
        item.seq.num_computed_tokens = 0
    runner.execute(prefix)
    return runner.execute(_mixed_step(runner, 1, params))


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2", "mistral"])
def test_native_forward_equals_transformers_forward(tiny_model_dirs, arch, linears):
    """Same steps (the context written by a first pass of each) through both forwards."""
    native, hf = _runner(tiny_model_dirs[arch], "e3rl"), _runner(tiny_model_dirs[arch],
                                                                  "transformers")
    assert native.model_impl == "e3rl" and hf.model_impl == "transformers"
    assert (native.fast_paths.tiled_linears > 0) == (linears == "tiled")
    a, b = _run_mixed_step(native), _run_mixed_step(hf)
    assert a.sample_rows == b.sample_rows
    scale = b.logits.abs().max()
    assert (a.logits - b.logits).abs().max() <= 0.02 * scale
    assert torch.equal(a.logits.argmax(-1), b.logits.argmax(-1))


def test_last_layer_runs_for_sampled_rows_only_without_changing_them(tiny_model_dirs,
                                                                     monkeypatch):
    """A step whose prompt rows need no logits runs the last layer's attention output, o
    projection and MLP for the sampled rows only; their logits are bit-identical to a step
    that needs every row's (prompt log-probs), which runs the whole last layer."""
    subsets = []
    rows_only = attention.rows_only

    def counted(meta, rows):
        sub = rows_only(meta, rows)
        subsets.append(None if sub is None else sub.native_decode.end)
        return sub

    monkeypatch.setattr(attention, "rows_only", counted)
    runner = _runner(tiny_model_dirs["qwen3"], "e3rl")
    sampled = _run_mixed_step(runner)
    # both steps: 3 decode rows + the 2 prompts' last rows of the 3 + 23 + 9 (3 + 32 + 41)
    assert subsets == [5, 5]
    runner = _runner(tiny_model_dirs["qwen3"], "e3rl")
    every = _run_mixed_step(runner, Params(max_tokens=4, prompt_logprobs=0))
    assert subsets == [5, 5, 5]  # the first pass again; then every row's logits are needed
    assert sampled.sample_rows != every.sample_rows  # the prompt rows come first in keep
    assert torch.equal(sampled.logits[sampled.sample_rows], every.logits[every.sample_rows])


def test_engine_greedy_and_logprobs_match_transformers_forward(tiny_model_dirs):
    prompts = [[5 + (7 * i + j) % 90 for j in range(10 + 13 * i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {impl: LLM(tiny_model_dirs["qwen3"], dtype="bfloat16", num_kv_blocks=64,
                      model_impl=impl).generate(prompts, params, use_tqdm=False)
            for impl in ("e3rl", "transformers")}
    agree = 0
    for a, b in zip(outs["e3rl"], outs["transformers"]):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        first_diff = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        agree += first_diff == len(ta)
        # up to the first near-tie both forwards chose the same tokens with ~equal log-probs
        assert a.outputs[0].logprobs[:first_diff] == pytest.approx(
            b.outputs[0].logprobs[:first_diff], abs=0.05)
    assert agree >= 3


def test_auto_uses_native_forward_only_where_it_applies(tiny_model_dirs, tmp_path):
    assert _runner(tiny_model_dirs["qwen3"], "auto").model_impl == "e3rl"
    fp32 = ModelRunner(EngineConfig(model=str(tiny_model_dirs["qwen3"]), dtype="float32",
                                    num_kv_blocks=64))
    assert fp32.model_impl == "transformers"  # fp32 stays token-identical to transformers
    gemma = build_random_model(tmp_path / "gemma", dict(
        model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256), seed=0)
    assert _runner(gemma, "auto").model_impl == "transformers"
    with pytest.raises(ModelNotSupported, match="model_impl e3rl: GemmaForCausalLM"):
        _runner(gemma, "e3rl")
    with pytest.raises(ModelNotSupported, match="CPU in bfloat16"):
        ModelRunner(EngineConfig(model=str(tiny_model_dirs["qwen3"]), dtype="float32",
                                 num_kv_blocks=64, model_impl="e3rl"))


def test_a_model_that_computes_differently_is_refused(tiny_model_dirs, monkeypatch):
    """Modules that look like the family's but compute something else fail the load-time
    check: auto falls back to transformers' forward, e3rl is refused."""
    from transformers.models.qwen3 import modeling_qwen3

    original = modeling_qwen3.Qwen3MLP.forward
    monkeypatch.setattr(modeling_qwen3.Qwen3MLP, "forward",
                        lambda self, x: original(self, x) * 2)
    assert _runner(tiny_model_dirs["qwen3"], "auto").model_impl == "transformers"
    with pytest.raises(ModelNotSupported, match="differ from transformers'"):
        _runner(tiny_model_dirs["qwen3"], "e3rl")


def test_weight_update_reaches_native_forward(tmp_path):
    config = dict(model_type="qwen3", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256)
    first = build_random_model(tmp_path / "a", config, seed=1, dtype=torch.bfloat16)
    second = build_random_model(tmp_path / "b", config, seed=2, dtype=torch.bfloat16)
    prompts = [[5 + (3 * i + j) % 50 for j in range(12)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(first, dtype="bfloat16", num_kv_blocks=64)
    assert llm.engine.runner.model_impl == "e3rl"
    llm.update_weights(second, "v2")
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    fresh = LLM(second, dtype="bfloat16", num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in fresh.generate(prompts, params, use_tqdm=False)]
    assert got == want


needs_bf16_gemm = pytest.mark.skipif(
    not (kernels.load_cpu_kernels() or kernels.gemm_available()),
    reason="this CPU has no AVX512_BF16 (the kernel is not built; oneDNN's product is used)")
needs_f32_gemm = pytest.mark.skipif(
    not (kernels.load_cpu_kernels() or kernels.gemm_available(torch.float32)),
    reason="this CPU has no AVX-512 (the kernel is not built; torch's product is used)")


@needs_bf16_gemm
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("outputs", [16, 48, 80, 112])  # 1, 3, 5 and 7 tiles: every group size
@pytest.mark.parametrize("bias", [False, True])
def test_small_gemm_equals_float32_product(rows, outputs, bias):
    x, w = _bf16((rows, 70), 10), _bf16((outputs, 70), 11)
    b = _bf16((outputs,), 12) if bias else None
    got = kernels.small_gemm(x, kernels.tile_weight(w), b)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, outputs)
    # float32 sums in another order, one bf16 rounding of the result
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-3 * want.abs().max())


@needs_f32_gemm
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("outputs", [16, 48, 80, 112])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_small_gemm_equals_float64_product(rows, outputs, bias):
    g = torch.Generator().manual_seed(rows * 1000 + outputs)
    x, w = torch.randn(rows, 69, generator=g), torch.randn(outputs, 69, generator=g)
    b = torch.randn(outputs, generator=g) if bias else None
    got = kernels.small_gemm(x, kernels.tile_weight(w), b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, outputs)
    # float32 sums of 69 products in order: a few ulps of the terms' magnitude
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * 69 ** 0.5)
    # each row's result is the same whatever rows come with it (batch-invariant)
    for r in range(rows):
        assert torch.equal(kernels.small_gemm(x[r:r + 1], kernels.tile_weight(w), b), got[r:r + 1])


@needs_bf16_gemm
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("outputs", [16, 32, 48, 80])  # 2, 4, 6, 10 tiles: pairs in every group
def test_fused_gate_up_equals_two_products_then_silu_mul(rows, outputs):
    x, gate, up = _bf16((rows, 70), 20), _bf16((outputs, 70), 21), _bf16((outputs, 70), 22)
    fused = kernels.tile_gate_up(gate, up)
    alone = [kernels.small_gemm(x, kernels.tile_weight(w), None) for w in (gate, up)]
    # each projection reads its own tiles of the shared weight: the same as its own copy
    assert torch.equal(kernels.small_gemm(x, fused, None, 0, 2), alone[0])
    assert torch.equal(kernels.small_gemm(x, fused, None, 1, 2), alone[1])
    # the one-pass SiLU-and-multiply has transformers' roundings: bit for bit the two steps
    assert torch.equal(kernels.small_gemm_silu_mul(x, fused), kernels.silu_mul(*alone))


@needs_bf16_gemm
def test_fused_gate_up_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="differ"):
        kernels.tile_gate_up(_bf16((16, 8), 0), _bf16((32, 8), 1))
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.tile_gate_up(_bf16((8, 8), 0), _bf16((8, 8), 1))
    with pytest.raises(RuntimeError, match="tile pairs"):
        kernels.small_gemm_silu_mul(_bf16((2, 8), 1), kernels.tile_weight(_bf16((48, 8), 2)))
    with pytest.raises(RuntimeError, match="do not select tiles"):
        kernels.small_gemm(_bf16((2, 8), 1), kernels.tile_weight(_bf16((32, 8), 2)), None, 2, 2)
    with pytest.raises(RuntimeError, match="do not select tiles"):
        kernels.small_gemm(_bf16((2, 8), 1), kernels.tile_weight(_bf16((32, 8), 2)), None, 0, 0)


@needs_bf16_gemm
def test_small_gemm_refuses_what_it_cannot_compute():
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.tile_weight(_bf16((20, 8), 0))
    with pytest.raises(RuntimeError, match="bf16 weight needs an even number of inputs"):
        kernels.tile_weight(_bf16((16, 7), 0))
    with pytest.raises(RuntimeError, match="must be bf16 or float32"):
        kernels.tile_weight(torch.ones(16, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="x has 6 inputs, weight 8"):
        kernels.small_gemm(_bf16((2, 6), 1), kernels.tile_weight(_bf16((16, 8), 2)), None)
    with pytest.raises(RuntimeError, match="x must be BFloat16"):
        kernels.small_gemm(torch.ones(2, 8), kernels.tile_weight(_bf16((16, 8), 2)), None)
    with pytest.raises(RuntimeError, match="x must be Float"):
        kernels.small_gemm(_bf16((2, 8), 1), kernels.tile_weight(torch.ones(16, 8)), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        kernels.small_gemm(torch.ones(2, 8), kernels.tile_weight(torch.ones(16, 8)),
                           torch.ones(8))
