"""Models: loading (full, LoRA, QLoRA), presets, adapters, and the llm-jp-3 tokenizer.

The only place that knows about peft and bitsandbytes. `loading.py` builds and saves models, `folders.py`
checks model and adapter folders (before loading, and what loaded), `merging.py` merges a LoRA / QLoRA policy
into plain weights (a copy for sampling, a folder for vLLM),
`tokenizer.py` the tokenizers shipped in the package.
"""

from .folders import SERVED_MODEL_TYPES, check_adapter_folder, check_architecture, check_model_folder
from .loading import (
    LLM_JP_IDS,
    PRESETS,
    SPECIAL_TOKENS,
    Device,
    ModelConfig,
    autocast_context,
    build_model,
    build_tokenizer,
    compute_dtype,
    format_prompt,
    is_peft,
    load_model,
    load_tokenizer,
    padding_side,
    pick_device,
    preset_tokenizer,
    reference_mode,
    save_model,
    save_preset,
    split_body_head,
    training_mode,
)
from .merging import merged_copy, sampling_policy, save_merged

__all__ = [
    "LLM_JP_IDS", "PRESETS", "SERVED_MODEL_TYPES", "SPECIAL_TOKENS", "Device", "ModelConfig", "autocast_context",
    "build_model", "build_tokenizer", "check_adapter_folder", "check_architecture", "check_model_folder",
    "compute_dtype", "format_prompt", "is_peft", "load_model", "load_tokenizer", "merged_copy", "padding_side",
    "pick_device", "preset_tokenizer", "reference_mode", "sampling_policy", "save_merged", "save_model",
    "save_preset", "split_body_head", "training_mode",
]
