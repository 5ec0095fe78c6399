"""The static decode loop (`engine/static.py`): fixed shapes, a cache that stays put, steps that a CUDA graph
replays. On a CPU its steps run as they are; they must give what the growing-cache loop gives, token for
token, while reading columns in pages and running rows in buckets, and a step must trace as one graph (no
host sync, no branch on a tensor's value: what a capture needs). On a GPU (`gpu`), the steps are replayed
from CUDA graphs and must give the same tokens."""

import pytest
import torch

from lite_selftrain.models import build_model
from lite_selftrain.sampling import SamplingConfig, generate
from lite_selftrain.sampling.engine.static import PAGE, ROW_STEP, row_bucket

PROMPTS = ["The cat sat on the mat", "1+2=", "hi", "a longer prompt, about nothing much at all", "qq"]


def _shapes(model, tok, prompts, cfg):
    """(completions, [(rows, key columns)] of each decode step the Python forward ran)."""
    shapes = []

    def seen(_module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # every prompt has 2 tokens or more: a decode step
            shapes.append((kwargs["input_ids"].shape[0], kwargs["attention_mask"].shape[-1]))

    hook = model.get_decoder().register_forward_pre_hook(seen, with_kwargs=True)
    try:
        return generate(model, tok, prompts, cfg, logprobs=True), shapes
    finally:
        hook.remove()


def _same(a, b):
    assert [[(c.token_ids, c.finish_reason) for c in g] for g in a] == [[(c.token_ids, c.finish_reason) for c in g]
                                                                          for g in b]
    lps = [torch.tensor([lp for g in x for c in g for lp in c.token_logprobs]) for x in (a, b)]
    torch.testing.assert_close(lps[0], lps[1], rtol=0, atol=1e-4)


def test_row_buckets():
    assert [row_bucket(r, 1000) for r in (1, 2, 3, 5, ROW_STEP)] == [1, 2, 4, 8, ROW_STEP]
    assert row_bucket(ROW_STEP + 1, 1000) == 2 * ROW_STEP and row_bucket(3 * ROW_STEP, 1000) == 3 * ROW_STEP
    assert row_bucket(70, 72) == 72 and row_bucket(5, 6) == 6  # never past the slots


def test_static_decode_reads_pages_of_columns_and_buckets_of_rows(tok):
    """Long replies cross several pages of columns; rows finish and join, so the row bucket changes."""
    model = build_model("tiny", vocab_size=len(tok), seed=3)
    knobs = dict(n=3, temperature=1.0, top_k=20, max_new_tokens=2 * PAGE + 20, seed=11, batch_size=2,
                 check_every=5)
    want, grown = _shapes(model, tok, PROMPTS, SamplingConfig(decode="eager", **knobs))
    got, fixed = _shapes(model, tok, PROMPTS, SamplingConfig(decode="graph", **knobs))
    _same(got, want)
    longest = max(len(tok(p)["input_ids"]) for p in PROMPTS) + knobs["max_new_tokens"] + knobs["check_every"] + 1
    assert {c for _, c in fixed} == {PAGE, 2 * PAGE, longest}  # pages as replies grow; the last one cut short
    assert all(b == row_bucket(b, 6) for b, _ in fixed) and len({b for b, _ in fixed}) > 1
    assert len(fixed) == len(grown)  # one forward per step, as in the growing loop


def test_static_decode_matches_greedy_and_top_p_rows(tok):
    """Greedy rows of a prompt stay equal; nucleus draws match the growing loop's."""
    model = build_model("tiny", vocab_size=len(tok), seed=4)
    for knobs in (dict(n=4, temperature=0.0), dict(n=2, temperature=0.8, top_p=0.9, seed=2)):
        cfg = dict(max_new_tokens=24, batch_size=3, check_every=3, **knobs)
        want = generate(model, tok, PROMPTS, SamplingConfig(decode="eager", **cfg), logprobs=True)
        got = generate(model, tok, PROMPTS, SamplingConfig(decode="graph", **cfg), logprobs=True)
        _same(got, want)


def test_a_step_has_no_host_sync_or_data_dependent_python(tok):
    """What a CUDA graph capture needs, checked where no GPU is: TorchDynamo traces one whole step (the
    model's forward through the slot cache, the lm_head, the draw, the end checks) as one graph, with no
    break. A `.item()`, a `.tolist()` or a branch on a tensor's value would break it."""
    import torch._dynamo as dynamo

    from lite_selftrain.models import split_body_head
    from lite_selftrain.sampling.engine.decode import cache_keyword
    from lite_selftrain.sampling.engine.static import StaticDecoder
    from lite_selftrain.sampling.stops import StopStrings, eos_table

    model = build_model("tiny", vocab_size=len(tok), seed=6).eval()
    body, head = split_body_head(model)
    vocab = head.weight.shape[0]
    cfg = SamplingConfig(n=3, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=40, batch_size=2, stop=("ab",))
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    with torch.inference_mode():
        decoder = StaticDecoder(body, head, ids, [0, 1, 2], cfg, eos=eos_table(model, tok, vocab, "cpu"),
                                stops=StopStrings(tok, cfg.stop, vocab, "cpu"), logprobs=True, pad_id=0,
                                context=2048, keyword=cache_keyword(body), graphs=False)
        decoder.rebuild(0)
        decoder.plan(0)
        explained = dynamo.explain(decoder._step)(*decoder.bucket)
    dynamo.reset()  # nothing compiled stays behind for other tests
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1 and decoder.step_count.item() == 1  # the step ran, once


@pytest.mark.gpu
def test_cuda_graphs_replay_the_steps_and_give_the_eager_tokens(tok):
    """On a GPU the steps are replayed from CUDA graphs: the Python forward runs only when a bucket is new
    (an eager step, then its capture), far fewer times than there are steps; the tokens are the eager ones."""
    model = build_model("tiny", vocab_size=len(tok), seed=5).to("cuda")
    cfg = dict(n=4, temperature=1.0, top_k=40, max_new_tokens=PAGE + 40, seed=7, batch_size=3, check_every=4)
    want, steps = _shapes(model, tok, PROMPTS, SamplingConfig(decode="eager", **cfg))
    got, python_steps = _shapes(model, tok, PROMPTS, SamplingConfig(decode="auto", **cfg))
    _same(got, want)
    assert len(python_steps) < len(steps) / 3  # the rest were replays
    greedy = dict(cfg, temperature=0.0)
    _same(generate(model, tok, PROMPTS, SamplingConfig(decode="graph", **greedy), logprobs=True),
          generate(model, tok, PROMPTS, SamplingConfig(decode="eager", **greedy), logprobs=True))
