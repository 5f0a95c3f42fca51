"""The policy loss against a plain Python loop over tokens and hand values."""

import math

import pytest
import torch

from e3rl.trainer.loss import clipped_surrogate, kl_k3, policy_loss, token_log_probs

EPS_LOW, EPS_HIGH, DUAL = 0.2, 0.28, 3.0


def reference_token(lp: float, old: float, a: float, m: float, eps_low: float,
                    eps_high: float, dual_clip: float) -> tuple[float, bool]:
    """PPO's per-token loss by cases (written independently of the tensor code)."""
    if m == 0:
        return 0.0, False
    r = math.exp(lp - old)
    if a > 0:
        if r > 1 + eps_high:
            return -(1 + eps_high) * a, True
        return -r * a, False
    if a < 0:
        if r < 1 - eps_low:
            return -(1 - eps_low) * a, True
        if dual_clip and r > dual_clip:
            return -dual_clip * a, True
        return -r * a, False
    return 0.0, False


def reference(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=DUAL):
    losses, clipped = [], []
    for lp_row, old_row, a_row, m_row in zip(logp.tolist(), old.tolist(), adv.tolist(),
                                             mask.tolist()):
        out = [reference_token(*t, eps_low, eps_high, dual_clip)
               for t in zip(lp_row, old_row, a_row, m_row)]
        losses.append([x for x, _ in out])
        clipped.append([c for _, c in out])
    return losses, clipped


def _random(seed: int, shape=(4, 13)):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=gen, dtype=torch.float64) * 4
    # log-ratios up to +-3: ratios from 0.05 to 20, far outside the clip range both ways
    logp = old + (torch.rand(shape, generator=gen, dtype=torch.float64) * 6 - 3)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    adv[0, :3] = 0.0
    mask = (torch.rand(shape, generator=gen) > 0.25).to(torch.float64)
    return logp, old, adv, mask


def test_clipped_surrogate_hand_values():
    # ratio, advantage -> per-token loss:
    #   r=2,   A=1:  clipped at 1.28        -> -1.28 (clipped)
    #   r=0.5, A=1:  min(0.5, 0.8) = 0.5    -> -0.5
    #   r=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> 0.8 (clipped)
    #   r=5,   A=-1: -5 < dual floor -3     -> 3 (clipped)
    #   r=2,   A=-1: min(-2, -1.28) = -2    -> 2
    #   r=1.1, A=2:  inside the range       -> -2.2
    ratios = torch.tensor([[2.0, 0.5, 0.5, 5.0, 2.0, 1.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    old = torch.full_like(ratios, -1.0)
    loss, clipped = clipped_surrogate(old + ratios.log(), old, adv, torch.ones_like(adv))
    assert loss[0].tolist() == pytest.approx([-1.28, -0.5, 0.8, 3.0, 2.0, -2.2])
    assert clipped[0].tolist() == [True, False, True, True, False, False]


def test_dual_clip_off():
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = old + math.log(5.0)
    adv = -torch.ones(1, 1, dtype=torch.float64)
    loss, clipped = clipped_surrogate(logp, old, adv, torch.ones_like(adv), dual_clip=0.0)
    assert loss.item() == pytest.approx(5.0) and not clipped.item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_surrogate_matches_loop(seed):
    logp, old, adv, mask = _random(seed)
    loss, clipped = clipped_surrogate(logp, old, adv, mask, EPS_LOW, EPS_HIGH, DUAL)
    want_loss, want_clipped = reference(logp, old, adv, mask)
    assert loss.shape == clipped.shape == logp.shape
    for got, want in zip(loss.tolist(), want_loss):
        assert got == pytest.approx(want, abs=1e-12)
    assert clipped.tolist() == want_clipped
    # the draw covers every case
    ratio = torch.exp(logp - old)
    assert ((ratio > 1 + EPS_HIGH) & (adv > 0)).any() and ((ratio < 1 - EPS_LOW) & (adv < 0)).any()
    assert ((ratio > DUAL) & (adv < 0)).any() and (adv < 0).any()


@pytest.mark.parametrize("seed", [0, 3])
def test_clip_fraction_counts_clipped_unmasked_tokens(seed):
    logp, old, adv, mask = _random(seed)
    terms = policy_loss(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                        dual_clip=DUAL)
    want_loss, want_clipped = reference(logp, old, adv, mask)
    assert terms.num_clipped == sum(map(sum, want_clipped))
    # a masked token that would be clipped is not counted
    all_clipped = reference(logp, old, adv, torch.ones_like(mask))[1]
    assert sum(map(sum, all_clipped)) > terms.num_clipped
    assert terms.loss_sum.item() == pytest.approx(sum(map(sum, want_loss)), abs=1e-10)
    ratio_sum = sum(math.exp(a - b) * m for ra, rb, rm in zip(logp.tolist(), old.tolist(),
                                                              mask.tolist())
                    for a, b, m in zip(ra, rb, rm))
    assert terms.ratio_sum == pytest.approx(ratio_sum, rel=1e-12)
    assert terms.kl_sum == 0.0


def test_masked_tokens_change_nothing():
    logp, old, adv, mask = _random(5)
    masked = mask == 0
    assert masked.any()

    def run(lp, a):
        lp = lp.clone().requires_grad_(True)
        terms = policy_loss(lp, old, a, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                            dual_clip=DUAL)
        terms.loss_sum.backward()
        return terms, lp.grad

    terms, grad = run(logp, adv)
    logp2 = torch.where(masked, logp + 7.0, logp)  # ratios up to e^10 at masked positions
    adv2 = torch.where(masked, -adv * 50 - 3, adv)
    terms2, grad2 = run(logp2, adv2)
    assert terms2.loss_sum.item() == terms.loss_sum.item()
    assert terms2.num_clipped == terms.num_clipped and terms2.ratio_sum == terms.ratio_sum
    assert torch.equal(grad[~masked], grad2[~masked])
    assert (grad[masked] == 0).all() and (grad2[masked] == 0).all()
    assert (grad[~masked] != 0).any()


def test_gradient_matches_hand_derivative():
    # inside the range the loss is -r*A, so d/d logp = -r*A; clipped tokens have gradient 0.
    old = torch.zeros(1, 3, dtype=torch.float64)
    ratios = torch.tensor([[1.1, 2.0, 5.0]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([[2.0, 1.0, -1.0]], dtype=torch.float64)
    loss, _ = clipped_surrogate(logp, old, adv, torch.ones_like(adv))
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-2.2, 0.0, 0.0])


def test_kl_k3_hand_values_and_sign():
    # logp = log 0.5, ref = log 0.25: d = ref - logp = -log 2; exp(d) - d - 1
    # = 0.5 + 0.6931472 - 1 = 0.1931472. Equal log-probs: 0. Masked: 0.
    logp = torch.tensor([[math.log(0.5), -1.0, math.log(0.25)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), -1.0, math.log(0.5)]], dtype=torch.float64)
    kl = kl_k3(logp, ref, torch.tensor([[1.0, 1.0, 1.0]]))
    # third: d = log 2: 2 - 0.6931472 - 1 = 0.3068528
    assert kl[0].tolist() == pytest.approx([0.1931472, 0.0, 0.3068528], abs=1e-7)
    assert kl_k3(logp, ref, torch.tensor([[0.0, 1.0, 0.0]]))[0].tolist() == [0.0, 0.0, 0.0]
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=gen) * 3, torch.randn(8, 8, generator=gen) * 3
    assert (kl_k3(a, b, torch.ones(8, 8)) >= 0).all()


def test_policy_loss_adds_kl():
    logp, old, adv, mask = _random(7)
    ref = logp + torch.randn(logp.shape, generator=torch.Generator().manual_seed(8),
                             dtype=torch.float64) * 0.5
    plain = policy_loss(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                        dual_clip=DUAL)
    kl_sum = sum((math.exp(r - p) - (r - p) - 1) * m
                 for rp, rr, rm in zip(logp.tolist(), ref.tolist(), mask.tolist())
                 for p, r, m in zip(rp, rr, rm))
    with_kl = policy_loss(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                          dual_clip=DUAL, ref_logp=ref, kl_coef=0.1)
    assert with_kl.kl_sum == pytest.approx(kl_sum, rel=1e-12)
    assert with_kl.loss_sum.item() == pytest.approx(plain.loss_sum.item() + 0.1 * kl_sum,
                                                    rel=1e-12)
    # a reference without kl_coef reports the KL but leaves the loss alone
    no_coef = policy_loss(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                          dual_clip=DUAL, ref_logp=ref)
    assert no_coef.kl_sum == pytest.approx(kl_sum, rel=1e-12)
    assert no_coef.loss_sum.item() == plain.loss_sum.item()


def test_token_log_probs_hand_values():
    # logits [0, log 3]: probs [1/4, 3/4]; at T = 0.5 logits/T = [0, 2 log 3]: [1/10, 9/10].
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    targets = torch.tensor([[0, 1]])
    assert token_log_probs(logits, targets)[0].tolist() == pytest.approx(
        [math.log(0.25), math.log(0.75)], abs=1e-6)
    assert token_log_probs(logits, targets, 0.5)[0].tolist() == pytest.approx(
        [math.log(0.1), math.log(0.9)], abs=1e-6)


def test_token_log_probs_matches_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    for temperature in (1.0, 0.7):
        out = token_log_probs(logits, targets, temperature)
        assert out.dtype == torch.float32 and out.shape == (2, 5)
        for b in range(2):
            for t in range(5):
                row = [x / temperature for x in logits[b, t].float().tolist()]
                log_z = math.log(sum(math.exp(x) for x in row))
                assert out[b, t].item() == pytest.approx(row[targets[b, t]] - log_z, abs=1e-5)
