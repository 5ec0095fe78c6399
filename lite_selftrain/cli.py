"""The `lite-selftrain` command: builds configs from TOML and flags, then calls library functions.

    lite-selftrain demo --out runs/demo                       the CPU demo: ReST-EM and RPO vs a control
    lite-selftrain rest-em --config examples/x.toml --out DIR  a recipe (also: rpo, self-reward, centrality)
    lite-selftrain sample | score | build | train | eval | plot   one stage on its own, files in and out

Recipe commands read a TOML file whose keys are the recipe's config fields, then apply `--set key=value`
overrides (dotted keys reach nested tables, values are TOML: `--set train.lr=1e-5 --set iterations=2`).
A run directory remembers its config and refuses a different one unless `--restart` is given.
Every `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import UserError


def _parse_overrides(pairs: tuple[str, ...]) -> dict:
    """`a.b=1` strings → nested dict, values parsed as TOML (bare words fall back to strings)."""
    from .config import tomllib

    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _recipe_config(cls, config_path: str | None, overrides: tuple[str, ...]):
    from .config import from_dict, read_toml

    data = read_toml(config_path) if config_path else {}
    return from_dict(cls, _merge(data, _parse_overrides(overrides)))


def _print_table(records: list[dict]) -> None:
    """Iteration, train accuracy, held-out pass@1 / pass@k / maj@k (largest k), dataset size."""
    ks = sorted({int(k.split("@")[1]) for r in records for k in r if k.startswith("test_maj@")})
    keys = ["recipe", "iteration", "train_accuracy", "test_pass@1"]
    keys += [f"test_pass@{ks[-1]}", f"test_maj@{ks[-1]}"] if ks and ks[-1] > 1 else []
    keys += ["dataset_size"]
    click.echo("  ".join(f"{k:>14}" for k in keys))
    for r in records:
        cells = [f"{r[k]:>14.3f}" if isinstance(r.get(k), float) else f"{r.get(k, ''):>14}" for k in keys]
        click.echo("  ".join(cells))


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="TOML file of the recipe's config fields.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config field (dotted for nested tables); repeatable.")
out_option = click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
restart_option = click.option("--restart", is_flag=True, help="Delete the run directory's contents first.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lite-selftrain")
def cli():
    """Self-training for small language models: sample, score, build, train, evaluate, repeat."""


# ----------------------------------------------------------------------------------------------------
# the demo and the recipes


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A shortened demo (a few minutes) with the same stages.")
@set_option
@restart_option
def demo(out, quick, overrides, restart):
    """Self-training on the built-in arith task, on the CPU, with a control; no downloads."""
    from .recipes.demo import DemoConfig, quick_config, run_demo

    cfg = quick_config() if quick else DemoConfig()
    if overrides:
        from .config import from_dict, to_dict

        cfg = from_dict(DemoConfig, _merge(to_dict(cfg), _parse_overrides(overrides)))
    result = run_demo(cfg, out, restart=restart, progress=True, echo=click.echo)
    _print_table(result["records"])
    click.echo(result["summary"])
    click.echo(f"plot: {result['plot']}")


def _recipe_command(name: str, module: str, config_cls: str, doc: str):
    @cli.command(name=name, help=doc)
    @config_option
    @set_option
    @out_option
    @restart_option
    def command(config_path, overrides, out, restart):
        import importlib

        from .plot import plot_metrics

        mod = importlib.import_module(f"lite_selftrain.recipes.{module}")
        cfg = _recipe_config(getattr(mod, config_cls), config_path, overrides)
        records, best = mod.run(cfg, out, restart=restart, progress=True)
        _print_table(records)
        click.echo(f"best iteration: {best['iteration'] if best else 'none (no iteration has the selection metric)'}")
        click.echo(f"plot: {plot_metrics(Path(out) / 'metrics.jsonl', Path(out) / 'accuracy.png')}")

    return command


_recipe_command("rest-em", "rest_em", "RestEMConfig", "ReST-EM: keep correct samples, retrain the base model.")
_recipe_command("rpo", "rpo", "RPOConfig", "Iterative RPO: DPO + NLL on correct vs incorrect samples.")
_recipe_command("self-reward", "self_rewarding", "SelfRewardConfig",
                "Self-Rewarding LM: write prompts, answer, judge yourself, DPO on best vs worst.")
_recipe_command("centrality", "centrality", "CentralityConfig",
                "Embedding-centrality self-selection (SFT or DPO) with one of four data policies.")


# ----------------------------------------------------------------------------------------------------
# the stages on their own


def _model_options(f):
    f = click.option("--adapter", default=None, help="A peft adapter folder to load on the model.")(f)
    f = click.option("--mode", type=click.Choice(["full", "lora", "qlora"]), default="lora", show_default=True)(f)
    f = click.option("--model", "model_name", default="tiny", show_default=True,
                     help="Preset name, local model folder, or hub id.")(f)
    return f


def _task_options(f):
    f = click.option("--data", default=None, help="Local JSONL / saved dataset (default: the task's own).")(f)
    f = click.option("--split", default="train", show_default=True)(f)
    f = click.option("--task", "task_name", required=True, help="gsm8k, math, arc, humaneval, apps, instruct, arith")(f)
    return f


def _load(model_name, mode, adapter):
    from .models import ModelConfig, load_model

    return load_model(ModelConfig(name=model_name, mode=mode, adapter=adapter))


@cli.command()
@_model_options
@_task_options
@click.option("--n", default=4, show_default=True, help="Samples per problem.")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-k", default=40, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--shots", default=4, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N problems.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Samples JSONL (resumable).")
def sample(model_name, mode, adapter, task_name, split, data, n, temperature, top_k, top_p, shots, limit, seed, out):
    """Draw N completions per problem into a JSONL file; a killed run resumes."""
    from .recipes.common import SampleConfig, sample_problems
    from .tasks import get_task

    task = get_task(task_name)
    examples = task.load(split, data)[:limit]
    model, tok = _load(model_name, mode, adapter)
    cfg = SampleConfig(n=n, temperature=temperature, top_k=top_k, top_p=top_p, shots=shots)
    click.echo(json.dumps(sample_problems(model, tok, task, examples, cfg, Path(out), seed=seed)))


@cli.command()
@_task_options
@click.option("--limit", type=int, default=None)
@click.option("--samples", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def score(task_name, split, data, limit, samples, out):
    """Add a reward to every sample of a samples file."""
    from .recipes.common import score_samples
    from .tasks import get_task

    task = get_task(task_name)
    click.echo(json.dumps(score_samples(task, task.load(split, data)[:limit], Path(samples), Path(out))))


@cli.command()
@click.option("--recipe", type=click.Choice(["rest-em", "rpo"]), required=True)
@_task_options
@click.option("--limit", type=int, default=None)
@click.option("--shots", default=4, show_default=True)
@click.option("--max-per-problem", default=10, show_default=True, help="ReST-EM's cap of kept samples.")
@click.option("--pairs-per-problem", default=10, show_default=True, help="RPO's K.")
@click.option("--scored", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def build(recipe, task_name, split, data, limit, shots, max_per_problem, pairs_per_problem, scored, out):
    """Turn scored samples into a training set: ReST-EM's kept samples or RPO's pairs."""
    from .recipes import rest_em, rpo
    from .recipes.common import SampleConfig, read_jsonl
    from .store import write_jsonl
    from .tasks import get_task

    task = get_task(task_name)
    problems = task.load(split, data)[:limit]
    sample_cfg = SampleConfig(shots=shots)
    if recipe == "rest-em":
        cfg = rest_em.RestEMConfig(task=task_name, sample=sample_cfg, max_per_problem=max_per_problem)
        records, info = rest_em.build_dataset(cfg, task, problems, read_jsonl(Path(scored)), 1)
    else:
        cfg = rpo.RPOConfig(task=task_name, sample=sample_cfg, pairs_per_problem=pairs_per_problem)
        records, info = rpo.build_pairs(cfg, task, problems, read_jsonl(Path(scored)), 1)
    write_jsonl(Path(out), records)
    click.echo(json.dumps(info))


@cli.command(name="train")
@_model_options
@click.option("--data", required=True, type=click.Path(exists=True), help="JSONL of prompt/response or pairs.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML of TrainConfig fields.")
@set_option
@click.option("--out", required=True, type=click.Path(file_okay=False))
def train_command(model_name, mode, adapter, data, config_path, overrides, out):
    """Fine-tune on a dataset (objective sft, rwnll or dpo_nll); resumes from its checkpoints."""
    from .data import load_records
    from .models import save_model
    from .train import TrainConfig, train

    cfg = _recipe_config(TrainConfig, config_path, overrides)
    records = load_records(data)  # bad data fails before the model is loaded
    model, tok = _load(model_name, mode, adapter)
    summary = train(model, tok, records, cfg, Path(out), progress=True)
    save_model(model, Path(out) / "model", tok)
    click.echo(json.dumps(summary, default=str))


@cli.command(name="eval")
@_model_options
@_task_options
@click.option("--limit", type=int, default=None)
@click.option("--n", default=8, show_default=True, help="Samples per problem for pass@k / maj@k.")
@click.option("--k", "ks", multiple=True, type=int, default=(1, 4, 8), show_default=True)
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--shots", default=4, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
def eval_command(model_name, mode, adapter, task_name, split, data, limit, n, ks, temperature, shots, out):
    """Greedy pass@1 and sampled pass@k / maj@k on a task split, with per-problem records."""
    from .recipes.common import EvalConfig, evaluate_policy
    from .tasks import get_task

    task = get_task(task_name)
    examples = task.load(split, data)
    model, tok = _load(model_name, mode, adapter)
    cfg = EvalConfig(split=split, limit=limit, n=n, ks=list(ks), temperature=temperature)
    click.echo(json.dumps(evaluate_policy(model, tok, task, examples, cfg, shots, Path(out))))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def plot(run_dir):
    """Draw RUN_DIR/accuracy.png from RUN_DIR/metrics.jsonl."""
    from .plot import plot_metrics

    click.echo(plot_metrics(Path(run_dir) / "metrics.jsonl", Path(run_dir) / "accuracy.png"))


def _quiet_libraries() -> None:
    """Third-party chatter (deprecation notices, optional-kernel hints) would bury our own messages."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main():
    _quiet_libraries()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
