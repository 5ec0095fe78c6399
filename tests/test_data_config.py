"""Data input and config parsing: clear one-line errors for bad input."""

from dataclasses import dataclass, field

import pytest

from lite_selftrain.config import from_dict, read_toml
from lite_selftrain.data import load_records
from lite_selftrain.errors import UserError


def test_jsonl_records_and_malformed_line(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"question": "1+1", "answer": "#### 2"}\n\n{"question": "2+2", "answer": "#### 4"}\n')
    assert [r["question"] for r in load_records(good)] == ["1+1", "2+2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:3: malformed JSON"):
        load_records(bad)


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "nope.jsonl")


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"q": "a"}, {"q": "b"}])}).save_to_disk(
        str(tmp_path / "ds"))
    assert [r["q"] for r in load_records(tmp_path / "ds", "train")] == ["a", "b"]
    with pytest.raises(UserError, match="no split 'test'"):
        load_records(tmp_path / "ds", "test")


def test_hub_name_offline_says_how_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="pass a local file"):
        load_records("openai/gsm8k", "train", config="main")


@dataclass
class Inner:
    r: int = 16


@dataclass
class Outer:
    lr: float = 1e-4
    name: str = "x"
    temps: list[float] = field(default_factory=lambda: [0.8])
    inner: Inner = field(default_factory=Inner)
    adapter: str | None = None


def test_from_dict_fills_nested_and_converts():
    cfg = from_dict(Outer, {"lr": 1, "temps": [1, 1.3], "inner": {"r": 8}, "adapter": None})
    assert cfg == Outer(lr=1.0, temps=[1.0, 1.3], inner=Inner(r=8))


def test_from_dict_rejects_mistyped_key_with_suggestion():
    with pytest.raises(UserError, match="unknown config key 'lrr'.*did you mean 'lr'"):
        from_dict(Outer, {"lrr": 1e-4})
    with pytest.raises(UserError, match=r"inner.rr"):
        from_dict(Outer, {"inner": {"rr": 1}})
    with pytest.raises(UserError, match="name must be a string, got 3"):
        from_dict(Outer, {"name": 3})


def test_read_toml_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_toml(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text("lr = = 1")
    with pytest.raises(UserError, match="invalid TOML"):
        read_toml(tmp_path / "c.toml")


@dataclass
class Parent:
    inner: Inner = field(default_factory=lambda: Inner(r=64))  # the parent's own default differs


def test_nested_table_starts_from_the_parents_default():
    assert from_dict(Parent, {"inner": {}}).inner.r == 64
    assert from_dict(Parent, {}).inner.r == 64
    from lite_selftrain.recipes.rpo import RPOConfig

    cfg = from_dict(RPOConfig, {"sample": {"batch_size": 4}})
    assert (cfg.sample.n, cfg.sample.top_k, cfg.sample.batch_size) == (30, 0, 4)
