"""Bad arguments to the Python API: a TypeError or ValueError whose one-line message says what was
expected (the command-line cases are in test_bad_inputs.py). Zero problems is no error: an empty result.
"""

import math

import pytest
import torch
from lite_selftrain.kernels import fused_logprob

from lite_selftrain.config import from_dict
from lite_selftrain.evaluate import EvalConfig
from lite_selftrain.models import ModelConfig, load_model, pick_device, save_model, save_preset
from lite_selftrain.recipes import self_rewarding
from lite_selftrain.sampling import SamplingConfig, generate
from lite_selftrain.tasks import get_task
from lite_selftrain.training import TrainConfig

H, W, T = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))


def _gsm(tmp, text):
    (tmp / "g.jsonl").write_text(text)
    return lambda: get_task("gsm8k").load("test", str(tmp / "g.jsonl"))


def _damaged_adapter(tmp):
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("{not json")
    return lambda: load_model(ModelConfig(name="tiny", adapter=str(tmp / "adapter")))


def _damaged_model(tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{not json")
    return lambda: load_model(ModelConfig(name=str(tmp / "model"), mode="full"))


def _eft(tmp):
    (tmp / "e.jsonl").write_text('{"prompt": "p", "response": "r", "score": "good"}\n')
    return lambda: self_rewarding.sft_records(self_rewarding.SelfRewardConfig(eft_path=str(tmp / "e.jsonl")), None, [])


def _truncated_weights(tmp):
    save_preset("tiny", tmp / "model")
    weights = tmp / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return lambda: load_model(ModelConfig(name=str(tmp / "model"), mode="full"))


def _truncated_adapter_weights(tmp):
    model, tok = load_model(ModelConfig(name="tiny"))
    save_model(model, tmp / "adapter", tok)
    weights = tmp / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    return lambda: load_model(ModelConfig(name="tiny", adapter=str(tmp / "adapter")))


API_CASES = [  # (id, callable or factory of tmp_path, exception type, text of the message)
    ("logprob-float-targets", lambda: fused_logprob(H, W, T.float()), TypeError, "integer tensor"),
    ("logprob-fraction-targets", lambda: fused_logprob(H, W, T + 0.5), TypeError, "integer tensor"),
    ("logprob-int-hidden", lambda: fused_logprob(H.long(), W, T), TypeError, "hidden must be a floating-point"),
    ("logprob-int-weight", lambda: fused_logprob(H, W.int(), T), TypeError, "weight must be a floating-point"),
    ("logprob-bool-targets", lambda: fused_logprob(H, W, T > 3), TypeError, "targets"),
    ("logprob-list", lambda: fused_logprob(H, W, [1, 2]), TypeError, "torch.Tensor"),
    ("logprob-bias-length", lambda: fused_logprob(H, W, T, torch.randn(5)), ValueError, "bias (5,)"),
    ("logprob-bias-int", lambda: fused_logprob(H, W, T, torch.zeros(11, dtype=torch.long)), TypeError, "bias"),
    ("logprob-shapes", lambda: fused_logprob(H, W, T[:, :2]), ValueError, "shapes do not match"),
    ("logprob-hidden-size", lambda: fused_logprob(H, torch.randn(11, 7), T), ValueError, "shapes do not match"),
    ("logprob-nan-t", lambda: fused_logprob(H, W, T, temperature=math.nan), ValueError, "finite positive"),
    ("logprob-zero-t", lambda: fused_logprob(H, W, T, temperature=0.0), ValueError, "finite positive"),
    ("logprob-neg-t", lambda: fused_logprob(H, W, T, temperature=-1), ValueError, "finite positive"),
    ("logprob-str-t", lambda: fused_logprob(H, W, T, temperature="1"), TypeError, "temperature must be a number"),
    ("logprob-vocab", lambda: fused_logprob(H, W, T + 11), ValueError, "outside the vocabulary"),
    ("logprob-impl", lambda: fused_logprob(H, W, T, impl="fast"), ValueError, "impl must be"),
    ("sampling-n-str", lambda: SamplingConfig(n="2"), TypeError, 'n must be a positive integer, got "2"'),
    ("sampling-n-zero", lambda: SamplingConfig(n=0), ValueError, "n must be a positive integer"),
    ("sampling-temp-nan", lambda: SamplingConfig(temperature=math.nan), ValueError, "temperature"),
    ("sampling-temp-inf", lambda: SamplingConfig(temperature=math.inf), ValueError, "temperature"),
    ("sampling-temp-neg", lambda: SamplingConfig(temperature=-0.1), ValueError, "(0 = greedy)"),
    ("sampling-top-p", lambda: SamplingConfig(top_p=0.0), ValueError, "top_p"),
    ("sampling-top-k", lambda: SamplingConfig(top_k=-1), ValueError, "top_k"),
    ("sampling-stop", lambda: SamplingConfig(stop=("",)), ValueError, "stop[0]"),
    ("sampling-backend", lambda: SamplingConfig(backend="tpu"), ValueError, "backend"),
    ("sampling-tokens", lambda: SamplingConfig(max_new_tokens=0), ValueError, "max_new_tokens"),
    ("sampling-replace", lambda: SamplingConfig().replace(n=-1), ValueError, "n must be"),
    ("generate-cfg", lambda: generate(None, None, ["a"], "greedy"), TypeError, "cfg must be a SamplingConfig"),
    ("generate-str-prompts", lambda: generate(None, None, "a prompt"), TypeError, "prompts must be a list of strings"),
    ("generate-int-prompt", lambda: generate(None, None, ["a", 3]), TypeError, "prompt 1 is a int"),
    ("task-name-type", lambda: get_task(3), TypeError, "task name must be a string"),
    ("task-unknown", lambda: get_task("chess"), ValueError, "unknown task"),
    ("task-shots", lambda: get_task("gsm8k", shots=-1), ValueError, "shots"),
    ("task-option", lambda: get_task("gsm8k", colour=1), ValueError, "task gsm8k has no option 'colour'"),
    ("task-option-arith", lambda: get_task("arith", colour=1), ValueError, "bad options for task arith"),
    ("sandbox-str-timeout", lambda: get_task("apps", sandbox={"timeout": "4"}), TypeError, "sandbox.timeout"),
    ("sandbox-zero-timeout", lambda: get_task("apps", sandbox={"timeout": 0}), ValueError, "sandbox.timeout"),
    ("sandbox-neg-memory", lambda: get_task("humaneval", sandbox={"memory_mb": -1}), ValueError, "sandbox.memory_mb"),
    ("sandbox-zero-cpu", lambda: get_task("apps", sandbox={"cpu_seconds": 0}), ValueError, "sandbox.cpu_seconds"),
    ("sandbox-workers", lambda: get_task("apps", sandbox={"workers": -2}), ValueError, "sandbox.workers"),
    ("sandbox-key", lambda: get_task("apps", sandbox={"timout": 4}), ValueError, "did you mean 'timeout'"),
    ("sandbox-type", lambda: get_task("apps", sandbox=5), TypeError, "sandbox must be"),
    ("model-device", lambda: ModelConfig(device="tpu"), ValueError, "device"),
    ("model-lora-r", lambda: ModelConfig(lora_r=0), ValueError, "lora_r"),
    ("model-mode", lambda: ModelConfig(mode="8bit"), ValueError, "mode"),
    ("model-dropout", lambda: ModelConfig(lora_dropout=1.5), ValueError, "lora_dropout"),
    ("train-lr", lambda: TrainConfig(lr=0), ValueError, "lr must be a positive number"),
    ("train-epochs", lambda: TrainConfig(epochs=0), ValueError, "epochs"),
    ("train-warmup", lambda: TrainConfig(warmup_ratio=-0.1), ValueError, "warmup_ratio"),
    ("eval-ks", lambda: EvalConfig(ks=[0]), ValueError, "ks[0]"),
    ("eval-select-on", lambda: EvalConfig(select_on="accuracy"), ValueError, "select_on"),
    ("from-dict-not-table", lambda: from_dict(TrainConfig, [1]), ValueError, "must be a table"),
    ("gsm-list-answer", lambda tmp: _gsm(tmp, '{"question": "q", "answer": [1]}\n'), ValueError, "g.jsonl:1: 'answer'"),
    ("gsm-null-answer", lambda tmp: _gsm(tmp, '{"question": "q", "answer": null}\n'), ValueError, "got null"),
    ("damaged-adapter", _damaged_adapter, ValueError, "adapter: a damaged peft adapter folder"),
    ("damaged-model", _damaged_model, ValueError, "model"),
    ("eft-score", _eft, ValueError, "e.jsonl:1: 'score' must be a number, got \"good\""),
    ("truncated-weights", _truncated_weights, ValueError, "could not load model"),
    ("truncated-adapter", _truncated_adapter_weights, ValueError, "a damaged peft adapter folder"),
]


@pytest.mark.parametrize("make, kind, expected", [pytest.param(m, k, e, id=i) for i, m, k, e in API_CASES])
def test_api_bad_input(tmp_path, make, kind, expected):
    call = make(tmp_path) if make.__code__.co_argcount == 1 else make
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and expected in message, message
    if "damaged" in str(make) or "truncated" in str(make):
        assert str(tmp_path) in message  # the folder is named


def test_zero_problems_give_an_empty_result(tmp_path, capsys):
    assert generate(None, None, [], SamplingConfig(n=4), out=tmp_path / "s.jsonl") == []
    assert not (tmp_path / "s.jsonl").exists()
    assert fused_logprob(torch.randn(0, 8), W, torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert SamplingConfig(temperature=0).temperature == 0  # greedy stays expressible


def test_enough_cases():
    assert len(API_CASES) >= 50


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_device_without_cuda_is_one_line():
    with pytest.raises(ValueError, match="model.device is cuda:1, but torch sees no CUDA device"):
        pick_device("cuda:1")
