"""Embedding-centrality selection: pick the response the model's own samples agree on (MBR, cosine utility).

    E = embed(model, tokenizer, texts)                       # (N, H) L2-normalised hidden-state means
    c = centrality(E)                                        # (N,) mean cosine similarity to the others
    records = select(model, tokenizer, candidates, originals, SelectionConfig(policy="central"))
    pairs = dpo_pairs(model, tokenizer, candidates)

The llm-jp self-selection study (Yoshida et al., ALGORITHMS.md §4) samples n responses per prompt from
M0, embeds each with M0's own hidden states, scores each by its mean cosine similarity to the other
candidates and retrains M0 on the winners. Its four policies:

    original             (1) keep the dataset's original response
    central              (2) the most central generated response
    central_or_drop      (3) as (2), but drop the example when the original ranks low among the candidates
    central_or_original  (4) as (2), but keep the original when it ranks low

"Ranks low": the original is scored in the pool of the n generated responses plus itself; it ranks low when
more than `rank_threshold` of the generated responses are strictly more central than it. The generated
winner is always the most central among the generated responses alone, so (2), (3) and (4) agree on it.
DPO pairs: chosen = most central, rejected = least central; a tie between them gives no pair.

Every decision is a record that names its policy and says why. Pure functions of embeddings (`decide`,
`pair`) carry the logic; `select` / `dpo_pairs` only embed and attach the texts.
Simplifications: texts are embedded alone (no prompt prefix; pass prompt + response to include it) and
cut at the model's context length; ties in centrality go to the lowest index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Fraction, NonNegativeFloat, PositiveInt, check_fields
from .errors import UserError
from .models import padding_side, split_body_head, training_mode

POLICIES = ("original", "central", "central_or_drop", "central_or_original")


@dataclass
class SelectionConfig:
    policy: str = "central"  # method (2): the poster's only policy at or above baseline quality
    rank_threshold: Fraction = 0.5  # the original ranks low when over half the samples are more central
    layer: int = -1  # hidden_states index: -1 = final (normed) layer, 0 = token embeddings
    pooling: str = "mean"  # mask-aware mean: a decoder's last token alone depends on where the text stops
    batch_size: PositiveInt = 32  # texts per forward pass
    tie_tol: NonNegativeFloat = 1e-6  # centrality gaps this small are ties: the DPO pair is skipped

    def __post_init__(self):
        check_fields(self)
        if self.policy not in POLICIES:
            raise UserError(f"selection policy must be one of {', '.join(POLICIES)}, not '{self.policy}'")
        if self.pooling not in ("mean", "last"):
            raise UserError(f"pooling must be mean or last, not '{self.pooling}'")


# ----------------------------------------------------------------------------------------------------
# embeddings and centrality


def embed(model, tokenizer, texts: list[str], *, layer: int = -1, pooling: str = "mean",
          batch_size: int = 32) -> torch.Tensor:
    """(N,) texts → (N, H) float32 CPU embeddings, L2-normalised, pooled over each text's own tokens (the BOS
    the model reads first is not pooled); a text with no tokens of its own gives zeros."""
    if pooling not in ("mean", "last"):
        raise UserError(f"pooling must be mean or last, not '{pooling}'")
    body, _ = split_body_head(model)
    if not texts:  # e.g. every candidate of a batch was unfinished
        return torch.zeros(0, body.config.hidden_size)
    context = getattr(body.config, "max_position_embeddings", None)
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=context is not None, max_length=context,
                    return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]  # BOS & co.: fed to the model, never pooled
    out = torch.zeros(len(ids), body.config.hidden_size)  # (N, H)
    order = sorted((i for i in range(len(ids)) if len(ids[i]) > sum(special[i])), key=lambda i: len(ids[i]))
    device = next(body.parameters()).device
    with torch.inference_mode(), training_mode(model, False), padding_side(tokenizer, "right"):
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt").to(device)
            content = batch["attention_mask"].clone()  # (B, T): 1 on the text's own tokens only
            for row, i in enumerate(chunk):
                content[row, : len(special[i])] *= 1 - torch.tensor(special[i], device=device)
            result = body(**batch, output_hidden_states=layer != -1)
            hidden = result.last_hidden_state if layer == -1 else result.hidden_states[layer]  # (B, T, H)
            hidden = hidden.float()
            if pooling == "mean":  # over content only: a BOS in the mean would weigh more in shorter texts
                pooled = (hidden * content[..., None]).sum(1) / content.sum(1, keepdim=True)  # (B, H)
            else:
                last = content.shape[1] - 1 - content.flip(1).argmax(1)  # (B,) the last content position
                pooled = hidden[torch.arange(len(chunk), device=device), last]  # (B, H)
            out[chunk] = F.normalize(pooled, dim=-1).cpu()
    return out


def centrality(embeddings: torch.Tensor) -> torch.Tensor:
    """(..., N, H) → (..., N): each candidate's mean cosine similarity to the N-1 others (0 when N = 1)."""
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.transpose(-1, -2)  # (..., N, N)
    n = sim.shape[-1]
    if n < 2:
        return torch.zeros(sim.shape[:-1])
    return (sim.sum(-1) - sim.diagonal(dim1=-2, dim2=-1)) / (n - 1)


# ----------------------------------------------------------------------------------------------------
# decisions on embeddings


def decide(generated: torch.Tensor | None, original: torch.Tensor | None, policy: str = "central",
           rank_threshold: float = 0.5) -> dict:
    """One prompt's decision. generated: (n, H) or None, original: (H,) or None.

    Returns {"policy", "decision": "generated" | "original" | "drop", "index" (of the generated winner),
    "reason", "centrality" (of the generated), "original_rank" (1 = most central of n + 1)}.
    """
    if policy not in POLICIES:
        raise UserError(f"selection policy must be one of {', '.join(POLICIES)}, not '{policy}'")
    record = dict(policy=policy, decision="drop", index=None, centrality=None, original_rank=None)
    n = 0 if generated is None else len(generated)
    if policy == "original":
        if original is None:
            return {**record, "reason": "no original response to keep"}
        return {**record, "decision": "original", "reason": "policy keeps the original response"}
    if n == 0:
        return {**record, "reason": "no generated candidates"}
    scores = centrality(generated)  # (n,)
    best = int(scores.argmax())
    record.update(centrality=scores.tolist(), index=best)
    winner = f"candidate {best} is the most central of {n} (mean cosine {float(scores[best]):.4f})"
    if policy == "central":
        return {**record, "decision": "generated", "reason": winner}
    if original is None:
        raise UserError(f"policy '{policy}' needs the original responses")
    pool = centrality(torch.cat([generated, original[None]]))  # (n + 1,)
    ahead = int((pool[:n] > pool[n]).sum())  # generated responses strictly more central than the original
    record["original_rank"] = ahead + 1
    where = f"the original ranks {ahead + 1} of {n + 1} ({ahead}/{n} samples more central"
    if ahead / n > rank_threshold:
        action = "drop" if policy == "central_or_drop" else "original"
        return {**record, "decision": action, "index": None,
                "reason": f"{where} > {rank_threshold:g}): ranks low, so {action}"}
    return {**record, "decision": "generated", "reason": f"{where} <= {rank_threshold:g}); {winner}"}


def pair(generated: torch.Tensor | None, tie_tol: float = 1e-6) -> dict:
    """A DPO pair from (n, H) embeddings: chosen = most central, rejected = least central; ties skipped."""
    record = dict(policy="dpo", decision="skip", chosen_index=None, rejected_index=None, centrality=None)
    n = 0 if generated is None else len(generated)
    if n < 2:
        return {**record, "reason": f"{n} candidate(s): a pair needs two"}
    scores = centrality(generated)
    hi, lo = int(scores.argmax()), int(scores.argmin())
    record["centrality"] = scores.tolist()
    gap = float(scores[hi] - scores[lo])
    if gap <= tie_tol:
        return {**record, "reason": f"all candidates tie on centrality (gap {gap:.2g})"}
    return {**record, "decision": "pair", "chosen_index": hi, "rejected_index": lo,
            "reason": f"candidate {hi} most central ({float(scores[hi]):.4f}), "
                      f"candidate {lo} least ({float(scores[lo]):.4f})"}


# ----------------------------------------------------------------------------------------------------
# texts in, records out


def _embed_groups(model, tokenizer, groups: list[list[str]], extra: list[str], cfg: SelectionConfig):
    """Embed every text of every group (and `extra`) in one batched pass; split back per group."""
    flat = [t for g in groups for t in g] + list(extra)
    e = embed(model, tokenizer, flat, layer=cfg.layer, pooling=cfg.pooling, batch_size=cfg.batch_size)
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + len(g))
    return [e[a:b] for a, b in zip(starts, starts[1:])], e[starts[-1] :]


def select(model, tokenizer, candidates: list[list[str]], originals: list[str | None] | None = None,
           cfg: SelectionConfig | None = None) -> list[dict]:
    """One record per prompt: {"prompt_index", "response" (None when dropped), **decide(...)}."""
    cfg = cfg or SelectionConfig()
    originals = list(originals) if originals is not None else [None] * len(candidates)
    if len(originals) != len(candidates):
        raise UserError(f"{len(candidates)} candidate groups but {len(originals)} original responses")
    if cfg.policy in ("central_or_drop", "central_or_original") and any(o is None for o in originals):
        raise UserError(f"policy '{cfg.policy}' needs an original response for every prompt")
    if cfg.policy == "original":  # nothing to embed: only whether an original exists matters
        embedded = [None] * len(candidates)
        orig = [None if o is None else torch.empty(0) for o in originals]
    else:
        needs_original = cfg.policy != "central"
        embedded, orig_e = _embed_groups(model, tokenizer, candidates, originals if needs_original else [], cfg)
        orig = list(orig_e) if needs_original else [None] * len(candidates)
    records = []
    for i, (group, original) in enumerate(zip(candidates, originals)):
        r = decide(embedded[i], orig[i], cfg.policy, cfg.rank_threshold)
        response = {"generated": group[r["index"]] if r["index"] is not None else None,
                    "original": original, "drop": None}[r["decision"]]
        records.append({"prompt_index": i, "response": response, **r})
    return records


def dpo_pairs(model, tokenizer, candidates: list[list[str]], cfg: SelectionConfig | None = None) -> list[dict]:
    """One record per prompt: {"prompt_index", "chosen", "rejected" (None when skipped), **pair(...)}."""
    cfg = cfg or SelectionConfig()
    embedded, _ = _embed_groups(model, tokenizer, candidates, [], cfg)
    records = []
    for i, (group, e) in enumerate(zip(candidates, embedded)):
        r = pair(e, cfg.tie_tol)
        chosen = rejected = None
        if r["decision"] == "pair":
            chosen, rejected = group[r["chosen_index"]], group[r["rejected_index"]]
            if chosen == rejected:
                r = {**r, "decision": "skip", "reason": "chosen and rejected are the same text"}
                chosen = rejected = None
        records.append({"prompt_index": i, "chosen": chosen, "rejected": rejected, **r})
    return records
