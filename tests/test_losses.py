"""The losses against hand computation: values, metrics and gradients, and exact gradient accumulation."""

import math

import pytest
import torch

from lite_selftrain.training.losses import dpo_nll_loss, reward_weighted_nll

PC = [-10.0, -20.0, -7.5, -3.0]  # policy log-probs of chosen responses
PR = [-12.0, -18.0, -9.0, -30.0]  # ... of rejected
RC = [-11.0, -19.0, -8.0, -3.5]  # reference log-probs of chosen
RR = [-11.0, -19.5, -8.5, -28.0]  # ... of rejected
LEN = [5, 10, 3, 2]  # chosen lengths


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("beta,alpha,nll_norm", [(0.1, 1.0, "sequence"), (0.5, 0.3, "token"), (0.1, 0.0, "sequence")])
def test_dpo_nll_matches_hand_computation(beta, alpha, nll_norm):
    pc, pr, rc, rr = _leaf(PC), _leaf(PR), _leaf(RC), _leaf(RR)
    loss, parts = dpo_nll_loss(pc, pr, rc, rr, torch.tensor(LEN), beta=beta, alpha=alpha, nll_norm=nll_norm)
    loss.backward()

    B = len(PC)
    z = [beta * ((PC[i] - RC[i]) - (PR[i] - RR[i])) for i in range(B)]
    dpo = sum(-math.log(_sigmoid(zi)) for zi in z) / B
    if nll_norm == "sequence":
        nll = sum(-PC[i] / LEN[i] for i in range(B)) / B
        dnll = [-1.0 / LEN[i] / B for i in range(B)]
    else:
        nll = -sum(PC) / sum(LEN)
        dnll = [-1.0 / sum(LEN)] * B
    assert loss.item() == pytest.approx(dpo + alpha * nll, rel=1e-12)
    assert parts["dpo"].item() == pytest.approx(dpo, rel=1e-12)
    assert parts["nll"].item() == pytest.approx(nll, rel=1e-12)

    # d/dz −log σ(z) = −σ(−z); z = β(πc − rc − πr + rr)
    g = [-_sigmoid(-zi) * beta / B for zi in z]
    for i in range(B):
        assert pc.grad[i].item() == pytest.approx(g[i] + alpha * dnll[i], rel=1e-10)
        assert pr.grad[i].item() == pytest.approx(-g[i], rel=1e-10)
        assert rc.grad[i].item() == pytest.approx(-g[i], rel=1e-10)
        assert rr.grad[i].item() == pytest.approx(g[i], rel=1e-10)

    chosen_r = [beta * (PC[i] - RC[i]) for i in range(B)]
    rejected_r = [beta * (PR[i] - RR[i]) for i in range(B)]
    assert parts["reward_chosen"].item() == pytest.approx(sum(chosen_r) / B)
    assert parts["reward_rejected"].item() == pytest.approx(sum(rejected_r) / B)
    assert parts["margin"].item() == pytest.approx(sum(z) / B)
    assert parts["reward_acc"].item() == pytest.approx(sum(zi > 0 for zi in z) / B)
    assert parts["logp_chosen"].item() == pytest.approx(sum(PC) / B)
    assert parts["logp_rejected"].item() == pytest.approx(sum(PR) / B)
    assert not any(v.requires_grad for v in parts.values())


def test_dpo_with_policy_equal_to_reference_is_log_two():
    pc, pr = _leaf(PC), _leaf(PR)
    loss, parts = dpo_nll_loss(pc, pr, pc.detach(), pr.detach(), torch.tensor(LEN), alpha=0.0)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert parts["margin"].item() == 0.0 and parts["reward_acc"].item() == 0.0


@pytest.mark.parametrize("nll_norm", ["sequence", "token"])
def test_micro_batches_with_step_totals_add_up_to_the_full_batch(nll_norm):
    full = [_leaf(v) for v in (PC, PR, RC, RR)]
    loss, parts = dpo_nll_loss(*full, torch.tensor(LEN), nll_norm=nll_norm)
    loss.backward()
    split = [_leaf(v) for v in (PC, PR, RC, RR)]
    total, dpo = 0.0, 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        part_loss, part = dpo_nll_loss(*(t[sl] for t in split), torch.tensor(LEN[sl]), nll_norm=nll_norm,
                                       num_pairs=len(PC), num_tokens=sum(LEN))
        part_loss.backward()
        total, dpo = total + part_loss.item(), dpo + part["dpo"].item()
    assert total == pytest.approx(loss.item(), rel=1e-12)
    assert dpo == pytest.approx(parts["dpo"].item(), rel=1e-12)
    for a, b in zip(full, split):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)


def test_dpo_rejects_unknown_nll_norm():
    with pytest.raises(ValueError, match="nll_norm"):
        dpo_nll_loss(*(torch.tensor(v) for v in (PC, PR, RC, RR)), torch.tensor(LEN), nll_norm="batch")


def test_reward_weighted_nll_matches_hand_computation():
    logps, lengths, rewards = _leaf([-4.0, -9.0, -2.5, -6.0]), [2, 6, 1, 3], [1.0, 0.5, 0.0, 2.0]
    loss = reward_weighted_nll(logps, torch.tensor(lengths), torch.tensor(rewards))
    loss.backward()
    tokens = sum(n for n, r in zip(lengths, rewards) if r != 0)  # the zero-reward sample carries no weight
    expected = -sum(r * lp for r, lp in zip(rewards, [-4.0, -9.0, -2.5, -6.0])) / tokens
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    for i, r in enumerate(rewards):
        assert logps.grad[i].item() == pytest.approx(-r / tokens, rel=1e-12)


def test_binary_rewards_are_sft_on_the_kept_samples():
    logps, lengths = torch.tensor([-4.0, -9.0, -2.5, -6.0]), torch.tensor([2, 6, 1, 3])
    keep = torch.tensor([True, False, True, True])
    weighted = reward_weighted_nll(logps, lengths, keep.double())
    sft = reward_weighted_nll(logps[keep], lengths[keep], torch.ones(3))
    assert weighted.item() == pytest.approx(sft.item(), rel=1e-6)  # float32
    assert sft.item() == pytest.approx((4.0 + 2.5 + 6.0) / (2 + 1 + 3), rel=1e-6)  # token-mean NLL


def test_reward_weighted_nll_with_all_zero_rewards_is_zero():
    logps = _leaf([-4.0, -9.0])
    loss = reward_weighted_nll(logps, torch.tensor([2, 3]), torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros(2, dtype=torch.float64))


def test_reward_weighted_nll_step_total_splits_exactly():
    logps, lengths, rewards = [-4.0, -9.0, -2.5, -6.0], [2, 6, 1, 3], [1.0, 0.5, 1.0, 2.0]
    whole = reward_weighted_nll(torch.tensor(logps), torch.tensor(lengths), torch.tensor(rewards))
    parts = sum(reward_weighted_nll(torch.tensor(logps[s]), torch.tensor(lengths[s]), torch.tensor(rewards[s]),
                                    num_tokens=sum(lengths)).item() for s in (slice(0, 3), slice(3, 4)))
    assert parts == pytest.approx(whole.item(), rel=1e-6)
