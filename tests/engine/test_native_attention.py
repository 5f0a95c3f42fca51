"""The native paged decode-attention kernel against SDPA over gathered blocks, and how the
engine picks its attention backend."""

import logging

import pytest
import torch
import torch.nn.functional as F

from e3rl.engine import LLM, kernels
from e3rl.engine import model_runner

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def reference(q, k_cache, v_cache, tables, lens, scale):
    """Each sequence on its own: gather its blocks, SDPA over its first lens[s] tokens."""
    hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    for s in range(q.shape[0]):
        k = k_cache[tables[s]].reshape(-1, hkv, k_cache.shape[3])[:lens[s]].transpose(0, 1)
        v = v_cache[tables[s]].reshape(-1, hkv, v_cache.shape[3])[:lens[s]].transpose(0, 1)
        o = F.scaled_dot_product_attention(q[s].unsqueeze(1).float(), k.float(), v.float(),
                                           scale=scale, enable_gqa=True)
        out[s] = o.squeeze(1).to(q.dtype)
    return out


@pytest.fixture(scope="module", autouse=True)
def built():
    kernels.load_cpu_kernels()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,group", [(64, 3), (128, 4), (64, 1), (128, 8), (40, 2),
                                            (16, 5), (64, 9)])
@pytest.mark.parametrize("num_seqs", [1, 9])
def test_kernel_matches_sdpa(dtype, head_dim, group, num_seqs):
    g = torch.Generator().manual_seed(head_dim * 31 + group * 7 + num_seqs)
    # Lengths at block edges and inside blocks; tables are scattered, unused tail ids are 0.
    lens = [1, 16, 17, 40, 95, 33, 2, 64, 81][:num_seqs]
    check_against_sdpa(g, dtype, lens, 2, group, head_dim, block_size=16, num_blocks=64)


def check_against_sdpa(g, dtype, lens, num_kv_heads, group, head_dim, block_size, num_blocks,
                       q_scale=1.0):
    """Random caches, each sequence's blocks scattered over the pool (unused table tail ids
    0), one query row per sequence: the kernel's output equals ``reference``."""
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    max_blocks = -(-max(lens) // block_size)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.long)
    used = 0
    for s, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[s, :nb] = perm[used:used + nb]
        used += nb
    q = q_scale * torch.randn(len(lens), num_kv_heads * group, head_dim, generator=g).to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5
    kernels.paged_decode_attention(out, q, k_cache, v_cache, tables, torch.tensor(lens), scale)
    expected = reference(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 40])  # the register kernels and the generic path
@pytest.mark.parametrize("block_size", [16, 24, 512])
def test_kernel_matches_sdpa_over_long_contexts(dtype, head_dim, block_size):
    """Contexts of several spans (the kernel takes up to 256 tokens of whole blocks per
    softmax step; 240 with 24-token blocks, one 512-token block), ending at and inside them."""
    g = torch.Generator().manual_seed(block_size + head_dim)
    lens = [1, 255, 256, 257, 700, 1100]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    # scores far apart between spans (q scaled by 4): the online softmax's rescaling must
    # carry them
    check_against_sdpa(g, dtype, lens, 2, 3, head_dim, block_size, num_blocks, q_scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rows_sharing_tables_attend_causally(dtype):
    """Prefill through the kernel: the rows of a chunk share their sequence's table (via
    ``row_tables``), each over its own causal context, mixed with decode rows; every row equals
    SDPA over its sequence's first ``context_lens[row]`` tokens."""
    g = torch.Generator().manual_seed(5)
    num_kv_heads, group, head_dim, block_size, num_blocks = 2, 3, 64, 16, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.stack([perm[0:5], perm[5:10], perm[10:15]])  # 3 sequences, 80 tokens each
    # a decode row of sequence 2, a 21-token chunk of sequence 0 after 30 cached tokens, and
    # a whole 9-token prompt of sequence 1
    row_tables = torch.tensor([2] + [0] * 21 + [1] * 9)
    lens = torch.tensor([77] + list(range(31, 52)) + list(range(1, 10)))
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=g).to(dtype)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, 0.125, row_tables)
    expected = reference(q, k_cache, v_cache, tables[row_tables], lens.tolist(), 0.125)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])
    with pytest.raises(RuntimeError, match="row_tables\\[1\\] = 3 is not a row"):
        kernels.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, 0.125,
                                       torch.tensor([2, 3] + [0] * 29))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,group", [(64, 3), (128, 4), (128, 8), (64, 1), (40, 2)])
@pytest.mark.parametrize("block_size", [16, 32, 24])
def test_kernel_prompt_tiles_match_sdpa(dtype, head_dim, group, block_size):
    """Long prompt chunks (bf16 with AVX512_BF16 attends them in tiles of up to 16 rows per KV
    head, spans of several 16-token chunks; other dtypes, head dims and block sizes row by row):
    a 300-token chunk after 50 cached tokens, a 37-token whole prompt, a 3-row chunk (too short
    for a tile) and decode rows; every row equals SDPA over its own causal context."""
    g = torch.Generator().manual_seed(11)
    num_kv_heads, num_blocks = 2, 96
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    per_seq = -(-400 // block_size)
    perm = torch.randperm(num_blocks, generator=g)[:3 * per_seq]
    tables = perm.view(3, per_seq)
    rows = [0] * 300 + [1] * 37 + [2] * 3 + [0, 1]
    lens = [*range(51, 351), *range(1, 38), *range(90, 93), 380, 200]
    row_tables, lens_t = torch.tensor(rows), torch.tensor(lens)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=g).to(dtype)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(out, q, k_cache, v_cache, tables, lens_t, 0.125, row_tables)
    expected = reference(q, k_cache, v_cache, tables[row_tables], lens, 0.125)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


def test_kernel_refuses_mismatched_inputs():
    k_cache = torch.zeros(4, 16, 2, 64)
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernels.paged_decode_attention(torch.empty_like(q), q, k_cache, k_cache,
                                       torch.zeros(1, 1, dtype=torch.long),
                                       torch.ones(1, dtype=torch.long), 0.125)
    q = torch.zeros(1, 3, 64)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        kernels.paged_decode_attention(torch.empty_like(q), q, k_cache, k_cache,
                                       torch.zeros(1, 1, dtype=torch.long),
                                       torch.ones(1, dtype=torch.long), 0.125)


def test_unknown_backend_is_refused(tiny_model):
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(tiny_model, num_kv_blocks=16, attention_backend="flash")


def test_auto_falls_back_to_sdpa_loudly_when_the_kernels_cannot_build(monkeypatch, caplog):
    def broken():
        raise kernels.KernelBuildError("could not build e3rl's CPU kernels (no compiler)")

    monkeypatch.setattr(kernels, "load_cpu_kernels", broken)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=model_runner.__name__):
        assert model_runner.resolve_attention_backend("auto", cpu) == "sdpa"
    assert "no compiler" in caplog.text and "falls back to SDPA" in caplog.text
    with pytest.raises(kernels.KernelBuildError, match="no compiler"):
        model_runner.resolve_attention_backend("native", cpu)
    assert model_runner.resolve_attention_backend("sdpa", cpu) == "sdpa"


def test_kernel_refuses_block_ids_outside_the_pool():
    k_cache = torch.zeros(4, 16, 2, 64)
    q = torch.zeros(1, 4, 64)
    with pytest.raises(RuntimeError, match="not a block of the cache"):
        kernels.paged_decode_attention(torch.empty_like(q), q, k_cache, k_cache,
                                       torch.tensor([[0, 4]]), torch.tensor([20]), 0.125)
    with pytest.raises(RuntimeError, match="context_lens"):
        kernels.paged_decode_attention(torch.empty_like(q), q, k_cache, k_cache,
                                       torch.tensor([[0, 1]]), torch.tensor([33]), 0.125)
