"""The ready-made configs in examples/: each parses into its recipe's config exactly as the CLI builds it,
with every size's `--set` flags, drops no recipe default, fits the memory budget, and shows up-to-date
estimates. No model is loaded.

An example names its CLI command in a first-line comment `# recipe: NAME` and lists `# size SIZE: --set
key=value ...` lines; the estimate blocks come from bench/estimate_memory.py (`--write` refreshes them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from lite_selftrain.config import load_config, merge, parse_overrides, read_toml
from lite_selftrain.errors import UserError
from lite_selftrain.recipes import RECIPES, load_recipe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
SIZES = ["150m", "980m", "1.8b", "3.7b"]


def header(path: Path) -> tuple[type, dict[str, list[str]]]:
    """(the recipe's config class, {size: ["key=value", ...]}) read from the comment lines."""
    text = path.read_text()
    first = text.splitlines()[0]
    m = re.fullmatch(r"# recipe: (\S+)", first)
    assert m and m.group(1) in RECIPES, f"{path.name}: first line must be '# recipe: <{'|'.join(RECIPES)}>'"
    sizes = {}
    for size, args in re.findall(r"^# size (\S+):(.*)$", text, re.M):
        words = shlex.split(args)
        pairs = len(words) % 2 == 0 and words[::2] == ["--set"] * (len(words) // 2)
        assert pairs, f"{path.name} {size}: expected '--set key=value' pairs, got {args.strip()!r}"
        sizes[size] = words[1::2]
    return load_recipe(m.group(1))[1], sizes


def on_defaults(default, data: dict):
    """`default` with the values of `data` put in, nested tables into nested dataclasses field by field."""
    changes = {}
    for key, value in data.items():
        current = getattr(default, key)
        is_table = dataclasses.is_dataclass(current) and isinstance(value, dict)
        changes[key] = on_defaults(current, value) if is_table else value
    return dataclasses.replace(default, **changes)


def leaf(node, dotted: str):
    """The value at a dotted key of a (nested) dataclass or dict."""
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def estimator():
    """bench/estimate_memory.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("estimate_memory", ROOT / "bench" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_there_are_examples_for_every_recipe():
    assert {header(p)[0].__name__ for p in EXAMPLES} == {recipe.config for recipe in RECIPES.values()}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_with_every_size(path):
    cls, sizes = header(path)
    assert list(sizes) == SIZES
    data = read_toml(path)
    base = load_config(cls, str(path))
    assert isinstance(base, cls)
    # a table in the file replaces the recipe's default table: it must not reset a field to the class default
    assert base == on_defaults(cls(), data)
    for size, overrides in sizes.items():
        cfg = load_config(cls, str(path), overrides)
        assert size in cfg.model.name, f"{path.name}: size {size} runs {cfg.model.name}"
        assert cfg == on_defaults(base, parse_overrides(overrides))  # nothing else moved
        assert cfg == on_defaults(cls(), merge(data, parse_overrides(overrides)))
        for pair in overrides:  # each flag took effect
            key = pair.split("=", 1)[0]
            assert leaf(cfg, key) == leaf(parse_overrides([pair]), key), f"{path.name} {size}: {pair}"


def test_a_mistyped_key_fails(tmp_path):
    path = next(p for p in EXAMPLES if header(p)[0].__name__ == "RestEMConfig")
    bad = tmp_path / path.name
    bad.write_text(path.read_text().replace("lora_r = 16", "lora_rank = 16"))
    cls, _ = header(path)
    with pytest.raises(UserError, match="model.lora_rank.*did you mean 'lora_r'"):
        load_config(cls, str(bad))
    with pytest.raises(UserError, match="unknown config key 'sample.nn'"):
        load_config(cls, str(path), ["sample.nn=3"])


def test_every_size_fits_and_the_estimates_shown_are_current():
    est = estimator()
    hw, rt = est.GPU(), est.Rates()
    rows = []
    for path in est.example_files():
        estimates = est.example_estimates(path, hw, rt)
        assert [e["size"] for e in estimates] == SIZES
        over = [f"{e['size']}: {e['peak_gib']:.1f} GiB ({e['peak_stage']})" for e in estimates if not e["fits"]]
        assert not over, f"{path.name} exceeds the {rt.budget_gib} GiB budget: {over}"
        block = est.render_block(estimates, hw, rt)
        assert block in path.read_text(), f"{path.name}: stale estimates; run python bench/estimate_memory.py --write"
        rows += estimates
    readme = (ROOT / "examples" / "README.md").read_text()
    assert est.render_table(rows, hw) in readme, "examples/README.md: stale table; run bench/estimate_memory.py --write"


def test_recipe_docstrings_name_existing_examples():
    for source in sorted((ROOT / "lite_selftrain" / "recipes").glob("*.py")):
        for name in re.findall(r"examples/([\w.-]+\.toml)", source.read_text()):
            assert (ROOT / "examples" / name).is_file(), f"{source.name} names examples/{name}, which does not exist"
