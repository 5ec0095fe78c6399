"""The native sampling engine: its own KV cache, `prefill` and `decode_step`, and the decode loop.

    for prompt_index, rows in engine.rows(model, tokenizer, ids, pending, cfg):   # cfg: a SamplingConfig
        token_ids, finish_reason, token_logprobs = rows[j]                            # sample j of the prompt

`sampling.generate` is the front door (tokenising, resuming, writing); this package only turns token ids into
token ids: one prefill per prompt shared by its n rows, then one token per row per step, drawn with
counter-based randomness so that a prompt's samples depend on (seed, its index) only. How it works and
what it simplifies (full-attention decoders only; no beam search): docs/engine.md.

`draws.py` the counter-based randomness and the token draw, `state.py` the per-row state and what the host
does when it looks, `decode.py` the cache, prefill, decode step and the decode loop with continuous refill,
`static.py` the same loop over fixed shapes and `graphs.py` its steps as CUDA graphs, `stream.py` the
entry point (`rows`): batches, the loop that runs them, the policy they decode with.
"""

from .decode import FINISH, KVCache, check_served, decode_step, prefill
from .draws import draw, mix32, uniforms
from .stream import batches, context_length, rows

__all__ = ["FINISH", "KVCache", "batches", "check_served", "context_length", "decode_step", "draw", "mix32",
           "prefill", "rows", "uniforms"]
