"""The checks of model and adapter folders: before anything loads from them, and of what loaded.

A model folder is refused in one line when its config.json is not an object of valid settings, names an
architecture the sampling engine does not serve, or when its other config files are not objects; a model
whose weights do not match its config (a weight missing would be left at its random init) is refused as
it loads. An adapter folder's config must be an object with LoRA's numbers in range, and its weights must
be those its config asks for. `loading.py` calls these; nothing here loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Fraction, PositiveFloat, PositiveInt, check_value
from ..errors import UserError


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a damaged folder raises: a bad JSON file, a truncated or mismatched weights file, a config
    field of the wrong type (transformers' strict config classes, or a TypeError / AttributeError deeper in),
    an attention implementation whose package is missing."""
    from huggingface_hub import errors
    from safetensors import SafetensorError

    strict = getattr(errors, "StrictDataclassError", OSError)  # huggingface_hub >= 0.35 checks config fields
    return OSError, ValueError, KeyError, RuntimeError, SafetensorError, strict, TypeError, AttributeError, ImportError


def first_line(e: BaseException) -> str:
    """The error's first two lines as one (strict-config errors put the field's problem on the second)."""
    return f"{type(e).__name__}: {' '.join(line.strip() for line in str(e).strip().splitlines()[:2])[:240]}"


# decoders whose native-engine samples equal transformers' own greedy decoding (tests/test_models.py checks each)
SERVED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "phi3", "olmo", "granite",
                      "stablelm", "gpt_neox", "gpt2")


def check_architecture(model_type, where) -> None:
    """A one-line error for a model the sampling engine does not serve (an encoder, an unknown type)."""
    if model_type not in SERVED_MODEL_TYPES:
        raise UserError(f"{where}: model_type {json.dumps(model_type)} is not an architecture the sampling engine "
                        f"serves ({', '.join(SERVED_MODEL_TYPES)})")


def _read_json_table(path: Path) -> dict:
    """A JSON file that must hold an object (a config); anything else is one `UserError` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object of settings, not {type(data).__name__}")
    return data


CONFIG_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def check_model_folder(path: Path) -> None:
    """The check of every model folder before anything loads from it: a config.json that is an object
    naming an architecture the engine serves, and its other config files objects too. (Its fields are
    checked by transformers as it loads, its weights against the config by `_check_loaded`.)"""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json)")
    from transformers import AutoConfig

    check_architecture(_read_json_table(path / "config.json").get("model_type"), path)
    for name in CONFIG_FILES:
        if (path / name).exists():
            _read_json_table(path / name)
    try:  # transformers checks each field's type and range as it reads them
        AutoConfig.from_pretrained(path, local_files_only=True)
    except load_errors() as e:
        raise UserError(f"{path / 'config.json'}: a damaged model config ({first_line(e)})") from None


def check_loaded(name: str, info: dict) -> None:
    """Refuse weights that do not fit the config: a missing one would be left at its random init."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if keys := sorted(map(str, info.get(kind) or ())):
            raise UserError(f"model '{name}': its weights do not match its config ({len(keys)} "
                            f"{kind.replace('_', ' ')}, e.g. {keys[0]})")


# what a LoRA adapter_config.json's numbers must be; the rest is peft's to check
ADAPTER_FIELDS = {"r": PositiveInt, "lora_alpha": PositiveFloat, "lora_dropout": Fraction}


def check_adapter_folder(path: Path) -> None:
    """An adapter folder's config, before peft reads it: an object, with LoRA's numbers in range."""
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"not a peft adapter folder: {path}")
    try:
        config = _read_json_table(path / "adapter_config.json")
        for key, annotation in ADAPTER_FIELDS.items():
            if key in config:
                check_value(config[key], annotation, key)
    except UserError as e:
        raise UserError(f"{path}: a damaged peft adapter folder ({e})") from None


def check_adapter_loaded(model, path: Path) -> None:
    """The adapter's saved weights are exactly those its config gives the model: a LoRA matrix missing from
    the file would stay at its fresh init (peft only warns), one too many belongs to another model."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():  # the older .bin format: peft's own check only
        return
    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    wanted = set(get_peft_model_state_dict(model))
    for kind, keys in (("missing", wanted - saved), ("unexpected", saved - wanted)):
        if keys:
            raise UserError(f"{path}: a damaged peft adapter folder ({len(keys)} {kind} weights, e.g. {min(keys)})")
