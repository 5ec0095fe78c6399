"""Embedding-centrality selection: embeddings against a per-text reference, centrality and every policy
on hand-made embeddings whose answer is obvious, and the text-level records on a tiny model."""

import math

import pytest
import torch

from lite_selftrain.errors import UserError
from lite_selftrain.mbr import SelectionConfig, centrality, decide, dpo_pairs, embed, pair, select


def at(*degrees):
    """Unit vectors in the plane at the given angles: cosines are cos(difference)."""
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def mean_cos(degrees, i):
    return sum(math.cos(math.radians(degrees[i] - d)) for j, d in enumerate(degrees) if j != i) / (len(degrees) - 1)


# ----------------------------------------------------------------------------------------------------
# embeddings


def reference_embedding(model, tok, text, layer=-1, pooling="mean"):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        states = model.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]  # (T, H)
    v = states.mean(0) if pooling == "mean" else states[-1]
    return v / v.norm()


@pytest.mark.parametrize("layer, pooling", [(-1, "mean"), (-1, "last"), (1, "mean"), (0, "last")])
def test_embed_matches_one_text_at_a_time(model, tok, layer, pooling):
    texts = ["a short one", "a much longer text than the others, to force padding", "x", "mid length text"]
    model.train()
    got = embed(model, tok, texts, layer=layer, pooling=pooling, batch_size=3)
    assert model.training  # the caller's mode is restored
    model.eval()
    want = torch.stack([reference_embedding(model, tok, t, layer, pooling) for t in texts])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4))


def test_embed_layer_zero_is_the_mean_token_embedding(model, tok):
    got = embed(model, tok, ["hello"], layer=0)[0]
    rows = model.get_input_embeddings().weight[tok("hello")["input_ids"]].detach().mean(0)
    torch.testing.assert_close(got, rows / rows.norm())


def test_embed_empty_text_is_zero(model, tok):
    got = embed(model, tok, ["", "abc"])
    assert torch.equal(got[0], torch.zeros_like(got[0])) and float(got[1].norm()) == pytest.approx(1.0)
    with pytest.raises(UserError, match="pooling"):
        embed(model, tok, ["abc"], pooling="max")


# ----------------------------------------------------------------------------------------------------
# centrality


def test_centrality_matches_hand_computation_and_finds_the_medoid():
    degrees = [-10, 0, 10, 180]
    c = centrality(at(*degrees))
    torch.testing.assert_close(c, torch.tensor([mean_cos(degrees, i) for i in range(4)]))
    assert int(c.argmax()) == 1 and int(c.argmin()) == 3  # the middle of the cluster; the outlier
    torch.testing.assert_close(centrality(at(*degrees) * torch.tensor([[1.0], [3.0], [0.5], [7.0]])), c)
    batched = centrality(torch.stack([at(*degrees), at(0, 80, 41, 60)]))  # (2, 4)
    torch.testing.assert_close(batched[0], c)
    torch.testing.assert_close(batched[1], torch.tensor([mean_cos([0, 80, 41, 60], i) for i in range(4)]))
    assert int(batched[1].argmax()) == 2  # 41 degrees sits nearest the others on average
    assert centrality(at(5)).tolist() == [0.0]


# ----------------------------------------------------------------------------------------------------
# the four policies and DPO pairs on hand-made embeddings

CLUSTER = at(-10, 0, 10, 180)  # candidate 1 is the medoid, candidate 3 the outlier


def test_policy_original():
    r = decide(CLUSTER, at(170)[0], "original")
    assert (r["decision"], r["policy"]) == ("original", "original") and "original" in r["reason"]
    assert decide(CLUSTER, None, "original")["decision"] == "drop"


def test_policy_central():
    r = decide(CLUSTER, None, "central")
    assert (r["decision"], r["index"], r["policy"]) == ("generated", 1, "central")
    assert "candidate 1 is the most central of 4" in r["reason"]
    assert decide(CLUSTER[:0], None, "central")["decision"] == "drop"


@pytest.mark.parametrize("policy, low_action", [("central_or_drop", "drop"), ("central_or_original", "original")])
def test_policies_that_check_the_original(policy, low_action):
    near = decide(CLUSTER, at(0)[0], policy)  # equal to the medoid: nothing is strictly more central
    assert (near["decision"], near["index"], near["original_rank"]) == ("generated", 1, 1)
    far = decide(CLUSTER, at(90)[0], policy)  # off the cluster: only the outlier ranks below it
    assert (far["decision"], far["index"], far["original_rank"]) == (low_action, None, 4)
    assert "ranks 4 of 5" in far["reason"] and far["policy"] == policy
    # the rank threshold: at 20 degrees, the samples at 0 and 10 degrees are ahead of the original
    pool = torch.tensor([mean_cos([-10, 0, 10, 180, 20], i) for i in range(5)])
    assert (pool[:4] > pool[4]).tolist() == [False, True, True, False]
    mid = decide(CLUSTER, at(20)[0], policy, rank_threshold=0.5)
    assert (mid["decision"], mid["index"], mid["original_rank"]) == ("generated", 1, 3)  # 2/4 is not > 0.5
    assert decide(CLUSTER, at(20)[0], policy, rank_threshold=0.25)["decision"] == low_action
    with pytest.raises(UserError, match="needs the original"):
        decide(CLUSTER, None, policy)


def test_dpo_pair_and_ties():
    r = pair(CLUSTER)
    assert (r["decision"], r["chosen_index"], r["rejected_index"]) == ("pair", 1, 3)
    assert pair(at(30, 30, 30))["decision"] == "skip"  # identical candidates tie
    assert pair(at(0, 50))["decision"] == "skip"  # two candidates are always equally central
    assert "a pair needs two" in pair(at(0))["reason"]


def test_unknown_policy():
    with pytest.raises(UserError, match="policy"):
        SelectionConfig(policy="best")


# ----------------------------------------------------------------------------------------------------
# texts in, records out


def test_select_and_dpo_pairs_on_texts(model, tok):
    groups = [["the cat sat", "the cat sat", "the cat sat", "0987 zq!"], ["same", "same", "same"], []]
    central = select(model, tok, groups, cfg=SelectionConfig(policy="central"))
    assert central[0]["response"] == "the cat sat" and central[0]["decision"] == "generated"
    assert central[2]["decision"] == "drop" and central[2]["reason"] == "no generated candidates"
    originals = ["0987 zq!", "same", "x"]
    dropped = select(model, tok, groups[:2], originals[:2], SelectionConfig(policy="central_or_drop",
                                                                            rank_threshold=0.5))
    assert [r["decision"] for r in dropped] == ["drop", "generated"]  # the outlier original ranks last
    kept = select(model, tok, groups[:2], originals[:2], SelectionConfig(policy="central_or_original"))
    assert [r["response"] for r in kept] == ["0987 zq!", "same"]
    orig = select(model, tok, groups, originals, SelectionConfig(policy="original"))
    assert [r["response"] for r in orig] == originals
    pairs = dpo_pairs(model, tok, groups)
    assert (pairs[0]["chosen"], pairs[0]["rejected"], pairs[0]["decision"]) == ("the cat sat", "0987 zq!", "pair")
    assert [p["decision"] for p in pairs[1:]] == ["skip", "skip"]
    assert all(p["policy"] == "dpo" and p["reason"] for p in pairs)
    with pytest.raises(UserError, match="needs an original"):
        select(model, tok, groups, None, SelectionConfig(policy="central_or_drop"))
