"""Shared test set-up: offline, a private preset cache, GPU tests skipped without CUDA.

Triton interpreter tests run in their own process (see test_kernels.py): TRITON_INTERPRET must be set
before triton defines the kernels, and the ahead-of-time compile tests need it unset.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download a model or dataset
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Child Pythons leave the working directory off sys.path: in the source checkout its `kernels/` folder would
# hide the PyPI package `kernels` that transformers imports (ours is installed as lite_selftrain.kernels).
os.environ.setdefault("PYTHONSAFEPATH", "1")


def pytest_configure(config):
    """A pytest-xdist worker (`pytest -n 2`) starts with the working directory on sys.path, which the main
    pytest process does not have: take it off there too, for the reason PYTHONSAFEPATH is set above."""
    if hasattr(config, "workerinput"):
        checkout = {"", os.getcwd(), str(Path(__file__).resolve().parents[1])}
        sys.path[:] = [entry for entry in sys.path if entry not in checkout]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread: the models here are tiny, and a second thread costs more in sync than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _preset_cache(tmp_path_factory):
    """Presets written for QLoRA loading go to a per-session folder, not the user's cache."""
    if "LITE_SELFTRAIN_CACHE" not in os.environ:
        os.environ["LITE_SELFTRAIN_CACHE"] = str(tmp_path_factory.mktemp("preset_cache"))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tok():
    """The local byte-level tokenizer."""
    from lite_selftrain.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A `tiny` preset model with seeded random weights."""
    from lite_selftrain.models import build_model

    return build_model("tiny", vocab_size=len(tok), seed=0)
