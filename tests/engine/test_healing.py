"""Self-healing invariants: erasures keep the KV state exact, free blocks, never leak text."""

import math

import pytest
from transformers import AutoModelForCausalLM

from e3rl.engine import LLM, InvalidRequest, SamplingParams
from e3rl.engine.healer import HealingParams, ThresholdEstimator
from e3rl.engine.healer.segmenter import segment_score
from tests.conftest import hf_logprobs

# Lines are rare in a random model's output: make common characters boundaries instead.
BOUNDARY = ["a", "e", "i", "o", " ", "\n"]
FORCE = dict(threshold=-1.0, segment_boundary=BOUNDARY, min_segment_tokens=2,
             max_segment_tokens=8, max_erasures=50, max_retries_per_segment=3,
             max_erased_fraction=1.0)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, num_kv_blocks=96, block_size=4)


def _run(llm, params, prompts=("hello", "abc", "The cat sat", "xyz")):
    return llm.generate(list(prompts), params)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_disabled_or_unreachable_threshold_changes_nothing(llm, temperature):
    base = SamplingParams(temperature=temperature, seed=7, max_tokens=40, ignore_eos=True)
    plain = _run(llm, base)
    off = _run(llm, base.clone(healing=HealingParams(enabled=False)))
    never = _run(llm, base.clone(healing=HealingParams(threshold=math.inf,
                                                       segment_boundary=BOUNDARY)))
    for a, b, c in zip(plain, off, never):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
        assert a.outputs[0].text == c.outputs[0].text
        assert c.outputs[0].erasures == [] and c.outputs[0].segments  # judged, kept


def test_forced_erasures_keep_logprobs_exact(llm, tiny_model):
    """Every returned token's log-prob, computed from the KV state after any number of
    erasures, equals a from-scratch forward over the final tokens."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=48, ignore_eos=True,
                            healing=FORCE)
    outs = _run(llm, params)
    assert sum(len(o.outputs[0].erasures) for o in outs) >= 8
    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    for out in outs:
        o = out.outputs[0]
        assert o.num_computed_tokens > len(o.token_ids)
        expected = hf_logprobs(model, out.prompt_token_ids, o.token_ids)
        assert o.logprobs == pytest.approx(expected, abs=2e-4)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_erasure_log_is_complete(llm):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=40, ignore_eos=True,
                            healing=FORCE)
    o = _run(llm, params, ["hello"])[0].outputs[0]
    assert o.erasures
    for e in o.erasures:
        assert len(e.erased_token_ids) == len(e.erased_nll) == len(e.erased_entropy) >= 1
        assert e.score == pytest.approx(segment_score("mean_nll", e.erased_nll, e.erased_entropy))
        assert e.score > e.threshold and e.attempt >= 1
        # The accepted replacement is what the output holds at that position.
        end = e.position + len(e.replacement_token_ids)
        assert o.token_ids[e.position:end] == e.replacement_token_ids
    starts = [s.start for s in o.segments]
    assert starts == sorted(starts) and o.segments[0].start == 0
    assert all(a.end == b.start for a, b in zip(o.segments, o.segments[1:]))


def test_peak_blocks_follow_live_length_not_erasures(tiny_model):
    llm = LLM(tiny_model, num_kv_blocks=64, block_size=4)
    engine = llm.engine
    prompt = list(range(5, 17))
    max_tokens = 40
    engine.add_request("h", prompt, SamplingParams(
        temperature=1.0, seed=5, max_tokens=max_tokens, ignore_eos=True,
        healing={**FORCE, "max_erasures": 200, "max_retries_per_segment": 6}))
    seq = engine.requests["h"].seqs[0]
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, len(seq.block_table), engine.block_manager.num_used_blocks)
    live_blocks = -(-(len(prompt) + max_tokens) // 4)
    assert len(seq.erasures) >= 10
    assert seq.num_model_tokens > 2 * (len(prompt) + max_tokens)  # far more was computed
    assert peak <= live_blocks
    assert engine.block_manager.num_free_blocks == 64


def test_deltas_never_show_erased_text(llm):
    engine = llm.engine
    engine.add_request("s", "hello there", SamplingParams(
        temperature=1.0, seed=2, max_tokens=50, ignore_eos=True, healing=FORCE))
    text, tokens, final = "", [], None
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for o in delta.outputs:
                text += o.text
                tokens += o.token_ids
                if o.finish_reason:
                    final = o
    seq_erasures = final.erasures
    assert seq_erasures
    full = llm.generate("hello there", SamplingParams(
        temperature=1.0, seed=2, max_tokens=50, ignore_eos=True, healing=FORCE))[0].outputs[0]
    assert tokens == full.token_ids and text == full.text


def test_threshold_estimator_quantile_and_cold_start():
    est = ThresholdEstimator(min_samples=10)
    assert est.quantile("mean_nll", 1.0, 0.9) is None
    for v in range(100):
        est.observe("mean_nll", 1.0, float(v))
    assert est.quantile("mean_nll", 1.0, 0.9) == pytest.approx(89.1)
    assert est.quantile("mean_nll", 0.5, 0.9) is None  # another temperature


def test_bad_healing_options_are_refused():
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(healing={"kappa": -1})
    assert info.value.param == "healing.kappa"
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(healing={"bogus": 1})
    assert info.value.param == "healing.bogus"
    with pytest.raises(InvalidRequest):
        SamplingParams(healing={"score": "median"})


class _FakeSeq:
    """The fields of a Sequence the healer reads."""

    def __init__(self):
        self.token_ids, self.nll, self.entropy, self.logprobs = [], [], [], []
        self.num_prompt_tokens = 0
        self.num_model_tokens = 0
        self.num_stable_tokens = 0
        self.erasures, self.segments = [], []

        class _Detok:
            text = ""
        self.detokenizer = _Detok()

    @property
    def num_output_tokens(self):
        return len(self.token_ids)

    @property
    def output_token_ids(self):
        return self.token_ids

    def add(self, tok, nll):
        self.token_ids.append(tok)
        self.nll.append(nll)
        self.entropy.append(nll)
        self.logprobs.append(-nll)
        self.num_model_tokens += 1

    def cut(self, n):
        for values in (self.token_ids, self.nll, self.entropy, self.logprobs):
            del values[n:]


def _healer(**options):
    from e3rl.engine.healer import Healer

    params = HealingParams(**{"threshold": 1.0, "min_segment_tokens": 1,
                              "max_erased_fraction": 1.0, **options})
    return Healer(params, 1.0, ThresholdEstimator(), max_tokens=100)


def _segment(healer, seq, nlls, tok=7):
    decision = None
    for k, nll in enumerate(nlls):
        seq.add(tok, nll)
        decision = healer.on_token(seq, k == len(nlls) - 1)
    return decision


def test_budget_spent_restores_the_lowest_score_attempt():
    healer, seq = _healer(max_retries_per_segment=2), _FakeSeq()
    assert _segment(healer, seq, [3.0, 3.0], tok=1).action == "erase"  # score 3
    seq.cut(0)
    assert _segment(healer, seq, [2.0, 2.0], tok=2).action == "erase"  # score 2
    seq.cut(0)
    decision = _segment(healer, seq, [5.0, 5.0], tok=3)  # score 5, no retry left
    assert decision.action == "restore" and decision.restore.token_ids == [2, 2]
    # The restored attempt is no longer logged as erased; the others are.
    assert sorted(e.erased_token_ids[0] for e in healer.pending_events) == [1, 3]
    seq.cut(0)
    for tok in decision.restore.token_ids:
        seq.add(tok, 2.0)
    healer.accept_restored(seq)
    assert [e.replacement_token_ids for e in seq.erasures] == [[2, 2], [2, 2]]
    assert seq.segments[0].score == 2.0 and seq.num_stable_tokens == 2


def test_budget_spent_keeps_the_current_attempt_when_it_is_best():
    healer, seq = _healer(max_retries_per_segment=1), _FakeSeq()
    assert _segment(healer, seq, [3.0, 3.0], tok=1).action == "erase"
    seq.cut(0)
    assert _segment(healer, seq, [2.0, 2.0], tok=2) is None  # best so far: accepted
    assert seq.erasures[0].replacement_token_ids == [2, 2]


def test_erasure_budget_per_sequence_and_share():
    healer, seq = _healer(max_erasures=1, max_retries_per_segment=5), _FakeSeq()
    assert _segment(healer, seq, [3.0, 3.0]).action == "erase"
    seq.cut(0)
    assert _segment(healer, seq, [1.5, 1.5]) is None  # over budget, and best: accepted
    healer2, seq2 = _healer(max_erased_fraction=0.01), _FakeSeq()
    assert _segment(healer2, seq2, [3.0, 3.0]) is None  # 2 tokens > 1% of 100


def test_ban_top_nll_token_and_hysteresis():
    healer, seq = _healer(ban_top_nll_token=True), _FakeSeq()
    seq.add(4, 0.1)
    healer.on_token(seq, False)
    seq.add(9, 5.0)
    assert healer.on_token(seq, True).action == "erase"
    seq.cut(0)
    seq.add(4, 0.1)
    assert healer.banned_token(seq) == 9  # same position as the erased attempt's worst token
    est = ThresholdEstimator(min_samples=1)
    for v in range(100):
        est.observe("mean_nll", 1.0, float(v))
    from e3rl.engine.healer import Healer

    h = Healer(HealingParams(quantile=0.5, hysteresis=0.2), 1.0, est, max_tokens=100)
    base = h.threshold()
    h.attempts.append(None)
    assert h.threshold() > base  # each retry raises the quantile


def test_retry_temperature_lets_greedy_requests_heal(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                            healing={**FORCE, "max_erasures": 3})
    never = _run(llm, params, ["hello"])[0].outputs[0]
    assert never.erasures == []  # greedy without a retry temperature: judged, not erased
    retry = _run(llm, params.clone(healing={**FORCE, "max_erasures": 3,
                                            "retry_temperature": 1.0}), ["hello"])[0].outputs[0]
    assert retry.erasures
