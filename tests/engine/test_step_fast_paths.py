"""The cheap-step fast paths equal the plain paths they replace, exactly: the detokenizer's
direct `tokenizers` decode, the sampler's batched Gumbel-max, the runner's array-built inputs."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from e3rl.engine.detokenizer import IncrementalDetokenizer, raw_decoder
from e3rl.engine.model_factory import build_char_tokenizer
from e3rl.engine.model_runner import _padded
from e3rl.engine.sampler import SamplingBatch, sample

TEXT = ["naïve café – 東京 🙂 ok", "ünïcödé bytes: 🙃🙃 déjà vu", "plain ascii words here"]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (multi-byte characters span tokens), trained offline."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["char", "byte-bpe"])
def tokenizer(request):
    return build_char_tokenizer() if request.param == "char" else _byte_level_bpe()


@pytest.mark.parametrize("skip", [True, False])
def test_raw_decoder_equals_tokenizer_decode(tokenizer, skip):
    decode = raw_decoder(tokenizer, skip)
    assert decode is not None
    gen = torch.Generator().manual_seed(0)
    for length in (0, 1, 2, 5, 17):
        for _ in range(20):
            ids = torch.randint(0, len(tokenizer), (length,), generator=gen).tolist()
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip,
                                                   clean_up_tokenization_spaces=False)


def test_raw_decoder_leaves_tokenizers_with_their_own_decode_alone():
    class Custom(PreTrainedTokenizerFast):
        def decode(self, token_ids, **kwargs):
            return "custom"

    tok = build_char_tokenizer()
    custom = Custom(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    assert raw_decoder(custom, True) is None
    detok = IncrementalDetokenizer(custom)
    assert detok._decode([5, 6]) == "custom"


def test_incremental_detokenizer_same_deltas_on_both_paths():
    tok = _byte_level_bpe()
    for text in TEXT:
        ids = tok(text)["input_ids"]
        fast, plain = IncrementalDetokenizer(tok), IncrementalDetokenizer(tok)
        plain._raw_decode = None
        prompt = [7, 8, 9]
        token_ids = list(prompt)
        for t in ids:
            token_ids.append(t)
            delta = fast.update(token_ids, len(prompt))
            assert delta == plain.update(token_ids[len(prompt):])
        assert fast.text == plain.text == tok.decode(ids, skip_special_tokens=True)


def _reference_sample(logits, batch):
    """The sampler's former per-row Gumbel-max loop (greedy rows: argmax of the logits)."""
    temps = torch.where(batch.temperatures == 0, torch.ones_like(batch.temperatures),
                        batch.temperatures)
    probs = (logits / temps.unsqueeze(1)).log_softmax(-1).exp()
    token_ids = logits.argmax(-1)
    for row, gen in enumerate(batch.generators):
        if gen is not None:
            noise = torch.empty_like(probs[row]).exponential_(generator=gen)
            token_ids[row] = (probs[row] / noise).argmax()
    return token_ids


@pytest.mark.parametrize("greedy_rows", [[], [0, 3], [1, 2, 4, 5]])
def test_batched_gumbel_max_equals_per_row_draws(greedy_rows):
    n, vocab = 6, 97
    torch.manual_seed(0)
    temps = torch.tensor([0.0 if r in greedy_rows else 0.5 + 0.25 * r for r in range(n)])

    def batch():
        gens = [None if r in greedy_rows else torch.Generator().manual_seed(100 + r)
                for r in range(n)]
        return SamplingBatch(temps, torch.zeros(n, dtype=torch.long), torch.ones(n),
                             torch.zeros(n), gens, [[]] * n)

    fast, ref = batch(), batch()
    for _ in range(5):  # several steps: the generators must advance identically
        logits = torch.randn(n, vocab) * 3
        assert sample(logits.clone(), fast).token_ids.tolist() == \
            _reference_sample(logits.clone(), ref).tolist()
    for g, h in zip(fast.generators, ref.generators):
        if g is not None:
            assert torch.equal(g.get_state(), h.get_state())


def test_padded_block_tables_equal_nested_tensor():
    tables = [[3, 1], [7, 8, 9, 4], [], [5]]
    flat = torch.tensor(_padded(tables)).view(len(tables), -1)
    assert torch.equal(flat, torch.tensor([t + [0] * (4 - len(t)) for t in tables]))
    assert _padded([]) == []


def test_runner_long_tensors_are_views_of_the_lists(tiny_model):
    from e3rl.engine import LLM

    runner = LLM(tiny_model, num_kv_blocks=16, block_size=4).engine.runner
    parts = [[1, 2, 3], [], [2**40, -1], [7]]
    out = runner._long_tensors(*parts)
    assert [t.dtype for t in out] == [torch.long] * 4
    assert [t.tolist() for t in out] == parts
    assert [t.tolist() for t in runner._long_tensors([], [])] == [[], []]
