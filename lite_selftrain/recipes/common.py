"""What every recipe loop stands on: a run directory whose stages run once, and the model of each iteration.

    job = Run(out, "rest_em", cfg)               # a different config is refused; nothing is written yet
    models = Iterates(job, cfg.model)            # models.get(t), models.fresh_base(), models.fit(t, ...)
    job.once(t, "sample", sample)                # sample(t) runs unless it finished before; its summary
    job.log(t, "eval", "build")                  # iteration t's metrics record, written once
    records, best = job.finish("valid_pass@1", validation=300)  # best.json: chosen on the validation split

The config is bound (config.json written, `--restart` applied) at the first write, so a run that fails
while it reads its task and data leaves no trace; a different config is refused at once. A stage runs at
most once: its summary goes to the run's state file and a re-run skips it. Stages write atomically (or,
sampling, as a resumable stream), so a kill loses at most the stage in progress, and the sampler and trainer
resume even that. Temporaries a killed process left are removed on resume and before every stage.

Several processes (`torchrun --nproc_per_node N -m lite_selftrain rest-em ...`): every rank runs every stage
function; rank 0 alone writes. The work inside a stage is sharded (`generate`, `score_samples`, `evaluate`,
`train`) or cheap and identical on every rank (building a dataset: seeded); `once` takes rank 0's word on
whether a stage is done and hands its summary to every rank, after which every rank reads what rank 0 wrote.

A run directory: config.json, state.json, metrics.jsonl, best.json, accuracy.png, and under <recipe>/iter_NN/
samples.jsonl, scored.jsonl (or judged.jsonl, decisions.jsonl), dataset.jsonl (+ dataset.ref_logps.pt,
DPO's reference), train/ (checkpoints), model/ (the iterate) and eval/ (per-problem records; eval/valid/);
policy/ (merged weights, when backend "vllm" served a LoRA / QLoRA iterate).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..config import to_dict
from ..errors import UserError
from ..models import PRESETS, ModelConfig, check_adapter_folder, check_model_folder, load_model, save_model
from ..sampling.vllm_backend import VllmServer
from ..store import TRAIN_FIELDS, RunStore, atomic_write_json, read_jsonl, sweep_temporaries, write_jsonl
from ..training import TrainConfig, train

CONFIG_VERSION = 2  # 2: train.reference decides DPO's reference, centrality's train.alpha its DPO α, + seed

# what a version-1 config (one without config_version) did, in today's fields, by config class: version 1
# replaced train.reference by the recipe's own reference whatever the field said
VERSION_1_MEANT = {"RPOConfig": {"reference": "current"}, "SelfRewardConfig": {"reference": "current"},
                   "CentralityConfig": {"reference": "current"}}


def _normal(config: dict) -> dict:
    return json.loads(json.dumps(config, default=str))  # tuples as lists, as the stored file has them


def _as_stored(old: dict | None, current: dict, config: Any) -> dict:
    """`current`, or the run folder's own config when that did the same: a folder made before `config_version`
    existed, or before a field was added, resumes (fields added since count at their defaults)."""
    if not old:
        return current
    if "config_version" in old:  # fields added since the folder was made count at their defaults
        defaults = _normal(to_dict(type(config)()))
        filled = {**old, **{k: v for k, v in _normal(current).items() if k not in old and v == defaults.get(k)}}
        return old if filled == _normal(current) else current
    current, kind = _normal(current), type(config).__name__
    upgraded = {**old, "config_version": CONFIG_VERSION}
    defaults = _normal(to_dict(type(config)()))
    upgraded |= {k: v for k, v in current.items() if k not in old and v == defaults.get(k)}
    if isinstance(upgraded.get("train"), dict):
        upgraded["train"] = {**upgraded["train"], **VERSION_1_MEANT.get(kind, {})}
        if kind == "CentralityConfig" and old.get("objective") == "sft":  # alpha is unused by SFT
            upgraded["train"]["alpha"] = current["train"]["alpha"]
    return old if upgraded == current else current


class Run:
    """One recipe's run directory: config binding, once-only stages, one metrics record per iteration."""

    def __init__(self, out: str | Path, recipe: str, config: Any, *, restart: bool = False):
        self.store = RunStore(out)
        self.recipe = recipe
        check_model_folders(config)  # a damaged model folder is refused before the run folder is bound
        current = {"recipe": recipe, "config_version": CONFIG_VERSION, **to_dict(config)}
        self.config = self.store.check_config(_as_stored(self.store.config(), current, config), restart=restart)
        self.restart, self.bound = restart, False
        self.summaries: dict[int, dict[str, dict]] = {}  # iteration -> stage -> summary, as logged

    def bind(self) -> None:
        """Write the config (deleting the folder's contents first with `restart`), once, before any output."""
        if not self.bound:
            dist.main_first(self._bind)  # the others wait: they read the folder once it is ready
            self.bound = True

    def _bind(self) -> None:
        self.store.bind_config(self.config, restart=self.restart)
        sweep_temporaries(self.store.root)

    def dir(self, iteration: int) -> Path:
        self.bind()
        return self.store.iteration_dir(self.recipe, iteration)

    def once(self, iteration: int, name: str, fn: Callable[[int], dict]) -> dict:
        """Run `fn(iteration)` unless this stage already finished; its summary (with its time) is kept and
        returned."""
        key = f"{self.recipe}/{iteration:02d}/{name}"
        self.bind()
        info = dist.broadcast(self.store.done_info(key) if dist.is_main() else None)  # rank 0's state decides
        if info is None:
            if dist.is_main():
                sweep_temporaries(self.store.root)  # what a kill inside this stage's writes left
            start = time.perf_counter()
            info = dict(fn(iteration))  # on every rank: see the module's docstring
            info["seconds"] = round(time.perf_counter() - start, 2)
            if dist.is_main():
                self.store.mark_done(key, info)
            info = dist.broadcast(info)  # rank 0's summary; after it, every rank reads what rank 0 wrote
        self.summaries.setdefault(iteration, {})[name] = info
        return info

    def log(self, iteration: int, *merge: str, **extra) -> dict:
        """Iteration's metrics record, appended once: the `merge` stages' summaries, `extra`, stage times."""
        self.bind()
        stages = self.summaries.get(iteration, {})
        record = {"recipe": self.recipe, "iteration": iteration}
        for name in merge:
            record.update({k: v for k, v in stages[name].items() if k != "seconds"})
        record.update(extra)
        record["seconds"] = {k: v.get("seconds") for k, v in stages.items()}
        return dist.main_first(self._append, record)

    def _append(self, record: dict) -> dict:
        return log_once(self.store, [record])[0]  # a re-run after a kill finds it already there

    def records(self) -> list[dict]:
        return [r for r in self.store.metrics.read() if r.get("recipe") == self.recipe]

    def finish(self, key: str, *, validation: int) -> tuple[list[dict], dict | None]:
        """(records, best record by the validation metric `key`); best.json names the best iterate's folder,
        the split that chose it (`validation` held-out training problems) and its test metrics, which only
        report."""
        if not key.startswith("valid_"):
            raise UserError(f"the best iteration is chosen on a validation metric, not '{key}'")
        records = self.records()
        best = best_iteration(records, key)
        if best is not None and dist.is_main():
            model = self.dir(best["iteration"]) / "model"
            atomic_write_json(self.store.root / "best.json", {
                "recipe": self.recipe, "selected_on": key, "split": "validation",
                "validation_problems": validation, "iteration": best["iteration"], key: best[key],
                "test": {k: v for k, v in best.items() if k.startswith("test_")},
                "model": str(model) if model.exists() else "the starting model"})
        return records, best


class Iterates:
    """The model of each iteration, loaded lazily from the run directory and kept while current.

    Iteration 0 is the base model (or what a recipe's own iteration-0 training saved); iteration t ≥ 1 is
    what iteration t's train stage saved: a peft adapter on the base, or a full model folder.
    Sampling goes through `sampler(t)`: a `VllmServer` per policy, whose vLLM engine (backend "vllm") starts
    at its first call and serves every later one, the iterate's evaluation and the next E-step alike, until
    training or another iterate closes it; the native backend samples the model in memory.
    """

    def __init__(self, run: Run, base: ModelConfig):
        self.run, self.base = run, base
        self.current: tuple[int, Any, Any] | None = None
        self.servers: dict[str, VllmServer] = {}  # by the folder vLLM loads: one engine per policy

    def config(self, iteration: int) -> ModelConfig:
        path = self.run.dir(iteration) / "model"
        if iteration == 0 and not path.exists():
            return self.base
        if self.base.mode == "full":
            return dataclasses.replace(self.base, name=str(path), adapter=None)
        return dataclasses.replace(self.base, adapter=str(path))

    def get(self, iteration: int):
        """(model, tokenizer) of `iteration`, loaded unless it is the one in memory."""
        if self.current is None or self.current[0] != iteration:
            self.close()  # the old iterate's engines go with it
            self.current = None  # let the old one go before loading the next
            self.current = (iteration, *load_model(self.config(iteration)))
        return self.current[1], self.current[2]

    def fresh_base(self):
        """The base model, loaded afresh (a new adapter), after letting the iterate in memory go."""
        self.close()
        self.current = None
        return load_model(self.base)

    def sampler(self, iteration: int):
        """(what `generate` samples iterate `iteration` with, its tokenizer): see the class docstring."""
        model, tokenizer = self.get(iteration)
        cfg = self.config(iteration)
        return self._server(model, tokenizer, self._plain_folder(cfg), self.run.dir(iteration) / "policy"), tokenizer

    def other_sampler(self, name: str | None, iteration: int = 0):
        """`other(name, iteration)` as a sampler: the fixed judge or prompt writer, on its own engine."""
        model, tokenizer = self.other(name, iteration)
        cfg = dataclasses.replace(self.base, name=name, adapter=None) if name else self.config(iteration)
        folder = self.run.dir(iteration) / ("policy_fixed" if name else "policy")
        return self._server(model, tokenizer, self._plain_folder(cfg), folder), tokenizer

    def _server(self, model, tokenizer, source: str | None, folder: Path) -> VllmServer:
        """The server of one policy, the same object until `close`; `folder` receives its merged weights once
        (a resumed run finds them there)."""
        key = source or str(folder)
        if key not in self.servers:
            self.servers[key] = VllmServer(model, tokenizer, folder=folder, source=source)
        self.servers[key].model = model  # the same policy, as now in memory: what the native backend samples
        return self.servers[key]

    def _plain_folder(self, cfg: ModelConfig) -> str | None:
        """A folder of plain weights vLLM can load as it is: a full model's own; None when it must be merged."""
        if cfg.mode == "full" and cfg.name not in PRESETS and (Path(cfg.name) / "config.json").exists():
            return cfg.name
        return None

    def close(self) -> None:
        """Stop every vLLM engine and give its memory back: before training, and at the end of a run."""
        for server in self.servers.values():
            server.close()
        self.servers = {}

    def other(self, name: str | None, iteration: int = 0):
        """(model, tokenizer) of a fixed model beside the iterate in memory: the model folder or hub id `name`
        (loaded in the base's mode), else iterate `iteration` loaded afresh. The caller lets it go."""
        if name:
            return load_model(dataclasses.replace(self.base, name=name, adapter=None))
        if self.current is not None and self.current[0] == iteration:
            return self.current[1], self.current[2]
        return load_model(self.config(iteration))

    def fit(self, iteration: int, model, tokenizer, cfg: TrainConfig, *, progress: bool,
            empty: str = "empty dataset: the iterate is its starting model") -> dict:
        """Train `model` on the iteration's dataset.jsonl and save it as that iterate (as is when it is empty).

        DPO's reference is `cfg.reference`'s ("current": the model as it starts); its log-probs are cached
        beside the dataset, so a resumed run does no second reference pass.
        """
        self.close()  # the engines' memory back before training
        d = self.run.dir(iteration)
        records = read_jsonl(d / "dataset.jsonl", TRAIN_FIELDS[cfg.objective])
        summary = {"skipped": empty}
        if records:  # on every rank: the trainer splits the batches across ranks (DDP)
            summary = train(model, tokenizer, records, cfg, d / "train",
                            reference_cache=d / "dataset.ref_logps.pt", progress=progress and dist.is_main())
        if dist.is_main():
            save_model(model, d / "model", tokenizer)
        self.current = (iteration, model, tokenizer)
        return summary


# ----------------------------------------------------------------------------------------------------
# small pieces of the loops


def log_once(store: RunStore, records: list[dict]) -> list[dict]:
    """Append to the store's metrics.jsonl each record whose (recipe, iteration) it lacks; returns the
    records as logged (an older one where it was there already)."""
    logged = {(r.get("recipe"), r.get("iteration")): r for r in store.metrics.recover()}
    new = [r for r in records if (r["recipe"], r["iteration"]) not in logged]
    store.metrics.append(new)
    return [logged.get((r["recipe"], r["iteration"]), r) for r in records]


def model_dir(out: str | Path, recipe: str, iteration: int) -> Path:
    """Where the run of `recipe` in `out` saves iteration t's model (its M_t)."""
    return RunStore(out).iteration_dir(recipe, iteration) / "model"


def check_model_folders(config: Any) -> None:
    """The local model and adapter folders a recipe config names (model, prompt_model, judge_model), checked
    as `models.check_model_folder` checks them; names of presets, hub ids and missing paths are left to loading."""
    model = getattr(config, "model", None)
    names = [model.name] if isinstance(model, ModelConfig) else []
    names += [name for key in ("prompt_model", "judge_model") if isinstance(name := getattr(config, key, None), str)]
    for name in names:
        if name not in PRESETS and Path(name).expanduser().is_dir():
            check_model_folder(Path(name).expanduser())
    if isinstance(model, ModelConfig) and model.adapter and Path(model.adapter).is_dir():
        check_adapter_folder(Path(model.adapter))


def check_trainable(model, *trainings: tuple[str, TrainConfig]) -> None:
    """Refuse, when a config is read, a model (a `models.ModelConfig`) that a training config cannot train;
    each training is (its key prefix in messages, e.g. "train.", its config). FSDP shards a full model."""
    for prefix, cfg in trainings:
        if cfg.parallel == "fsdp" and model.mode != "full":
            raise UserError(f"{prefix}parallel fsdp is for full fine-tuning (model.mode full), not model.mode "
                            f"{model.mode}: adapters train with {prefix}parallel ddp")


def write_stage(path: Path, records: list[dict], info: dict) -> dict:
    """Write a stage's records to `path` (atomically; rank 0 alone under a launcher) and return its summary."""
    if dist.is_main():
        write_jsonl(path, records)
    return info


def best_iteration(records: list[dict], key: str) -> dict | None:
    """The iteration with the highest `key` (earliest on ties): self-training can over-fit later.

    None when no iteration has the metric (e.g. a judge that never gave a parsable score).
    """
    scored = [r for r in records if r.get(key) is not None]
    return max(scored, key=lambda r: (r[key], -r["iteration"])) if scored else None
