"""The training objectives, as pure functions of sequence log-prob sums: no model, no optimiser.

    loss, parts = dpo_nll_loss(pi_c, pi_r, ref_c, ref_r, chosen_lengths, beta=0.1, alpha=1.0)
    loss = reward_weighted_nll(logps, lengths, rewards)

Inputs are per-sequence sums of response-token log-probs (B,) as `logprobs.sequence_logprobs` returns
them, and response token counts (B,). Both losses take optional normalisers (`num_pairs`, `num_tokens`):
the trainer passes the totals of a whole optimiser step, so the losses of its micro-batches add up to
the loss of the full batch exactly (gradient accumulation without any reweighting).

Simplifications: only the two losses the recipes use; the DPO loss is the sigmoid form with no label
smoothing or reference-free variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NLL_NORMS = ("sequence", "token")


def dpo_nll_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, *, beta=0.1,
                 alpha=1.0, nll_norm="sequence", num_pairs=None, num_tokens=None):
    """DPO + NLL on the chosen response: Iterative RPO (Pang et al. 2024, arXiv 2404.19733, eq. 1).

    With πc = log M_θ(c|x), rc = log M_ref(c|x) (and r for the rejected response), over B pairs:

        L_DPO = 1/B · Σ −log σ( β·[(πc − rc) − (πr − rr)] )          (Rafailov et al. 2023, arXiv 2305.18290)
        NLL   = 1/B · Σ (−πc / |c|)        nll_norm="sequence": the RPO paper's per-sequence mean
              = −Σ πc / Σ |c|              nll_norm="token": TRL's and Liger's mean over all chosen tokens
        L     = L_DPO + α · NLL            α = 0 is plain DPO; β = 0.1, α = 1 are the paper's values

    `num_pairs` / `num_tokens` replace B / Σ|c| (the step's totals under gradient accumulation).
    Returns (loss, parts): `parts["dpo"]` and `parts["nll"]` are this batch's shares of the two terms
    (loss == dpo + α·nll); the rest are means over this batch's pairs, detached: implicit rewards
    β·(π − r) of chosen and rejected, reward accuracy (chosen reward above rejected), margin (their
    difference), and the policy log-probs of both responses (the RPO diagnostic: without the NLL term
    the chosen log-prob falls).
    """
    if nll_norm not in NLL_NORMS:
        raise ValueError(f"nll_norm must be one of {NLL_NORMS}, not {nll_norm!r}")
    chosen_lengths = chosen_lengths.to(policy_chosen.dtype)
    pairs = policy_chosen.shape[0] if num_pairs is None else num_pairs
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)  # (B,)
    dpo = -F.logsigmoid(chosen_reward - rejected_reward).sum() / pairs
    if nll_norm == "sequence":
        nll = (-policy_chosen / chosen_lengths.clamp(min=1)).sum() / pairs
    else:
        tokens = chosen_lengths.sum() if num_tokens is None else num_tokens
        nll = -policy_chosen.sum() / max(float(tokens), 1.0)
    loss = dpo + alpha * nll
    with torch.no_grad():
        margin = chosen_reward - rejected_reward
        parts = {
            "dpo": dpo.detach(),
            "nll": nll.detach(),
            "reward_chosen": chosen_reward.mean(),
            "reward_rejected": rejected_reward.mean(),
            "reward_acc": (margin > 0).float().mean(),
            "margin": margin.mean(),
            "logp_chosen": policy_chosen.detach().mean(),
            "logp_rejected": policy_rejected.detach().mean(),
        }
    return loss, parts


def reward_weighted_nll(logps, lengths, rewards, *, num_tokens=None):
    """Reward-weighted NLL, the M-step of ReST-EM (Singh et al. 2023, arXiv 2312.06585, eq. 2).

        L = −Σ r_i · log p_θ(y_i | x_i) / Σ_{i: r_i ≠ 0} |y_i|

    The paper maximises J(θ) = Σ r(x, y) · log p_θ(y|x); dividing by the number of tokens that carry
    weight makes it a token mean, so with binary rewards it is exactly ordinary SFT on the kept samples
    (all rewards 1 is plain SFT). `num_tokens` replaces the denominator (the step's total under gradient
    accumulation). Inputs (B,); returns a scalar.
    """
    rewards = rewards.to(logps.dtype)
    if num_tokens is None:
        num_tokens = lengths[rewards != 0].sum()
    return -(rewards * logps).sum() / max(float(num_tokens), 1.0)
