"""A LoRA / QLoRA policy as plain dense weights: a merged copy in memory, or a saved model folder.

    policy = sampling_policy(model)            # what the sampling engine decodes with: a merged copy, or model
    save_merged(model, "policy/", tokenizer)   # what vLLM loads: the same weights as a folder

Each LoRA layer's weight becomes W + s·B·A (a QLoRA base dequantised first, dequant(W_4bit) + s·B·A): the
weights the adapter model's forward pass computes with, so a plain model over them is the policy, up to
float rounding, and decodes with plain GEMMs and a 16-bit KV cache instead of bitsandbytes + peft.
The model itself is never changed. Simplifications: a copy shares (read-only) every tensor that needs no
change; whether a copy fits is estimated from the parameter count against half the free memory (the rest
is left to the KV cache), not measured.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

from .loading import is_peft, save_model

FREE_SHARE = 0.5  # a merged copy may take half the free memory: the KV cache and activations need the rest


def _dequantized(tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as the dense tensor its layer multiplies by; any other tensor as it is."""
    if getattr(tensor, "quant_state", None) is None:
        return tensor.data
    import bitsandbytes.functional as bnb

    return bnb.dequantize_4bit(tensor.data, tensor.quant_state)


def _dense_weight(module, leaf: str) -> torch.Tensor:
    """`module`'s parameter `leaf` as a plain tensor: dequantized, with the active LoRA updates added (none
    while the adapter is disabled, as under `reference_mode`, or already merged into the base)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return _dequantized(getattr(module, leaf))
    layer = module.get_base_layer()
    if leaf != "weight" or module.disable_adapters or module.merged:
        return _dequantized(getattr(layer, leaf))
    weight = _dequantized(layer.weight)
    for name in module.active_adapters:
        if name in module.lora_A:
            weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight


def _saved_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def merged_copy(model, dtype: torch.dtype | None = None):
    """A plain causal LM (eval mode, no gradients) with the effective weights of peft `model`, in `dtype`
    (None: the dtype its config was saved in). Tensors already in that form are shared, not copied."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # the merged weights are dense
        delattr(config, "quantization_config")
    dtype = dtype or _saved_dtype(config)
    with torch.device("meta"):  # names and shapes only: the tensors come from `model`
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = {}
    with torch.no_grad():  # the copy is no part of the training graph
        for key in plain.state_dict():
            owner, _, leaf = key.rpartition(".")
            weights[key] = _dense_weight(base.get_submodule(owner), leaf).to(dtype).contiguous()
    plain.load_state_dict(weights, assign=True)
    for name, buffer in list(plain.named_buffers()):  # buffers outside the state dict (rotary inv_freq)
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, base.get_buffer(name), persistent=False)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(getattr(base, "generation_config", plain.generation_config))
    return plain.eval().requires_grad_(False)


def save_merged(model, path: str | Path, tokenizer=None) -> Path:
    """Save `model` as a plain model folder, whatever its mode; atomic. The model in memory is not changed.

    Weights keep the base's saved dtype (bf16 on a GPU), so an engine that loads weights itself (vLLM)
    serves the policy that was trained, up to float rounding.
    """
    if not is_peft(model):
        return save_model(model, path, tokenizer)
    return save_model(merged_copy(model), path, tokenizer)


def dense_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of `model`'s weights as dense `dtype` tensors: 4-bit ones counted at their full shape, LoRA
    factors not at all (they are merged in)."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total * torch.empty((), dtype=dtype).element_size()


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: the card's free memory plus what torch's allocator holds
    unused (training leaves it cached), or the host's available memory."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    import psutil

    return psutil.virtual_memory().available


def sampling_dtype(model, device: torch.device) -> torch.dtype:
    """bf16 on a CUDA card that has it (else fp16); elsewhere the dtype the model's embeddings already have."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return model.get_input_embeddings().weight.dtype


def sampling_policy(model, merge: bool = True, *, free: int | None = None):
    """The model to sample `model` with: a merged copy of a LoRA / QLoRA policy when `merge` and it fits
    (a `FREE_SHARE` of the free memory, or of `free` bytes), else `model` itself. One line says the choice."""
    if not merge or not is_peft(model):
        return model
    device = model.get_input_embeddings().weight.device
    dtype = sampling_dtype(model, device)
    need, name = dense_bytes(model, dtype), str(dtype).removeprefix("torch.")
    free = free_bytes(device) if free is None else free
    if need > FREE_SHARE * free:
        print(f"sampling: the adapter model as it is (a merged {name} copy needs {need / 2**30:.2f} GiB, "
              f"{free / 2**30:.2f} GiB free)", file=sys.stderr)
        return model
    print(f"sampling: a merged {name} copy of the adapter model ({need / 2**30:.2f} GiB)", file=sys.stderr)
    return merged_copy(model, dtype)
