"""Sampling: n completions per prompt behind one `generate`, whichever backend runs.

`generate.py` is the front door (`SamplingConfig`, `generate`, resumable sample files), `engine/`
the native KV-cache decoder (`stops.py`: where its rows end), `vllm_backend.py` the vLLM backend.
"""

from .generate import Completion, SamplingConfig, check_prompts, check_resumable, generate, group_by_prompt, sampled

__all__ = ["Completion", "SamplingConfig", "check_prompts", "check_resumable", "generate", "group_by_prompt",
           "sampled"]
