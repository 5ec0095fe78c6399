"""Continuous refill: rows leave the decode batch as they finish and the next prompts' rows take their slots.

Each row draws with its own (seed, prompt, sample, step) uniforms, so a prompt's samples are the same
whether its rows join a half-finished batch or start in one that holds every prompt (no refill at all).
"""

import pytest
import torch

from lite_selftrain.models import build_model
from lite_selftrain.sampling import SamplingConfig, generate

PROMPTS = ["The cat sat", "1+2=", "a much longer prompt about nothing", "hi", "x y z", "zz top", "q"]


def _run(model, tok, batch_size, **knobs):
    """(completions, decode batch sizes step by step, prefill calls) of one `generate` call."""
    sizes, prefills = [], []

    def seen(_module, args, kwargs):
        ids = kwargs["input_ids"]
        (sizes if ids.shape[1] == 1 else prefills).append(ids.shape[0])

    hook = model.get_decoder().register_forward_pre_hook(seen, with_kwargs=True)
    try:
        out = generate(model, tok, PROMPTS, SamplingConfig(batch_size=batch_size, **knobs), logprobs=True)
    finally:
        hook.remove()
    return out, sizes, prefills


def _exact(groups):
    return [[(c.token_ids, c.text, c.finish_reason) for c in group] for group in groups]


def _logprobs(groups):
    return torch.tensor([lp for group in groups for c in group for lp in c.token_logprobs], dtype=torch.float64)


def _mixed(model, tok):
    """Knobs under which some rows end with EOS, some with a stop string and some at the length limit."""
    free = generate(model, tok, PROMPTS, SamplingConfig(n=3, temperature=1.0, max_new_tokens=20, seed=5))
    row = free[0][0].token_ids
    eos = next(t for k, t in enumerate(row) if k >= 3 and t not in row[:k] and t > 3)  # ends early rows
    text = free[1][2].text
    stop = next(text[k : k + 2] for k in range(4, 16) if text[k : k + 2].isprintable() and text[k : k + 2] not in
                text[: k + 1])
    return eos, dict(n=3, temperature=1.0, max_new_tokens=20, seed=5, stop=(stop, "\x00never"))


@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_refill_gives_the_samples_of_one_batch_for_a_mixed_eos_stop_length_batch(tok, decode):
    """Under both decode loops (the growing cache; fixed shapes, run as they are on a CPU), against the
    growing cache with every prompt in one batch."""
    model = build_model("tiny", vocab_size=len(tok), seed=0)
    eos, knobs = _mixed(model, tok)
    model.generation_config.eos_token_id = [2, eos]
    whole, whole_sizes, whole_prefills = _run(model, tok, len(PROMPTS), decode="eager", **knobs)  # one batch
    for batch_size, check_every in ((2, 4), (1, 1), (3, 3)):
        refilled, sizes, prefills = _run(model, tok, batch_size, check_every=check_every, decode=decode, **knobs)
        assert _exact(refilled) == _exact(whole)  # token ids, text and finish reason, sample by sample
        torch.testing.assert_close(_logprobs(refilled), _logprobs(whole), rtol=0, atol=1e-4)  # float sums differ
        assert max(sizes) <= 3 * batch_size and len(prefills) > 1  # rows joined a running batch ...
        assert any(b > a for a, b in zip(sizes, sizes[1:]))  # ... which grew again as they did
    reasons = {c.finish_reason for group in whole for c in group}
    assert reasons == {"eos", "stop", "length"}
    assert len(whole_prefills) == 1 and whole_sizes[0] == 3 * len(PROMPTS)


def test_refill_keeps_greedy_rows_of_a_prompt_identical(tok):
    """n greedy rows share one prefill and stay equal, whichever slots they took."""
    model = build_model("tiny", vocab_size=len(tok), seed=2)
    got, _, _ = _run(model, tok, 2, n=4, temperature=0.0, max_new_tokens=9, check_every=2)
    assert all(len({tuple(c.token_ids) for c in group}) == 1 for group in got)
    want, _, _ = _run(model, tok, len(PROMPTS), n=1, temperature=0.0, max_new_tokens=9)
    assert [g[0].token_ids for g in got] == [g[0].token_ids for g in want]
    assert torch.tensor([len(g) for g in got]).eq(4).all()
