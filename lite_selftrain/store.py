"""The run directory: the only code that touches an experiment's files.

One directory per experiment holds its config (`config.json`), a state file (`state.json`, finished stages),
`metrics.jsonl`, and per-iteration folders of samples, datasets and adapters. Three rules make a killed job
safe to restart:

- whole files and folders are written to a temporary name beside their target, fsynced, then renamed over
  it (atomic on POSIX); every temporary name starts with `.lite-tmp.<pid>.`, so what a killed process left
  behind is recognisable, and `sweep_temporaries` removes it (the recipes do on every resume and stage);
- JSONL files are append-only, one `write` per batch of complete lines; a kill can only leave a torn
  *last* line (no trailing newline), which `JsonlLog.recover` detects and truncates away before the next
  append. A complete line that does not parse is corruption, never a torn write: it is reported, not dropped;
- `read_jsonl` reads whole files (user data, or files written whole) strictly: every line counts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

TMP_PREFIX = ".lite-tmp."  # temporary entries are named .lite-tmp.<pid>.<target name>.<random>


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_prefix(target: Path) -> str:
    return f"{TMP_PREFIX}{os.getpid()}.{target.name}."


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path` that replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))
    old = None
    try:
        yield tmp
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_temporaries(root: str | Path, *, report: bool = True) -> list[Path]:
    """Remove the temporary files and folders under `root` left by processes no longer running.

    Only entries named `.lite-tmp.<pid>.…` whose process is gone (or is this one, between writes) go;
    a running writer's temporaries stay. With `report`, one line on stderr says what went. Returns it.
    """
    root, removed = Path(root), []
    if not root.is_dir():
        return removed
    for entry in sorted(Path(root).rglob(f"{TMP_PREFIX}*")):  # parents before their contents
        pid = entry.name[len(TMP_PREFIX):].split(".", 1)[0]
        if any(entry.is_relative_to(gone) for gone in removed) or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed and report:
        names = ", ".join(str(p.relative_to(root)) for p in removed)
        print(f"{root}: removed {len(removed)} temporary entries a stopped run left: {names}", file=sys.stderr)
    return removed


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """A whole JSONL file, atomically: readers see the old file or every new line."""
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode())


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


# what a record field must hold, by kind: (accepted types, words for the message); numbers must be finite
KINDS = {"any": ((object,), "any value"), "string": ((str,), "a string"), "number": ((int, float), "a number"),
         "index": ((int,), "an integer index"), "table": ((dict,), "a table"), "list": ((list,), "a list"),
         "ids": ((list,), "a list of token ids"), "finish": ((str,), "one of eos, stop, length"),
         "numbers": ((list,), "a list of numbers")}  # `kind|null`: that kind, or null
FINISH_REASONS = ("eos", "stop", "length")  # how a completion ended (sampling.Completion.finish_reason)
# the stage files, by what reads them; a field whose name ends in `?` is optional but checked when present
SAMPLE_FIELDS = {"prompt_index": "index", "sample_index?": "index", "text": "string", "token_ids?": "ids",
                 "finish_reason?": "finish"}  # what scoring reads of a samples file
SCORED_FIELDS = {**SAMPLE_FIELDS, "reward": "number", "finish_reason": "finish"}  # what building reads
COMPLETION_FIELDS = {"prompt_index": "index", "sample_index": "index", "prompt_hash?": "string", "text": "string",
                     "token_ids": "ids", "num_tokens": "index", "finish_reason": "finish", "logprob?": "number|null",
                     "token_logprobs?": "numbers|null"}  # what a resumed sampling job reads back
_IDS = {"response_ids?": "ids", "chosen_ids?": "ids", "rejected_ids?": "ids"}  # the sampler's own tokens
TRAIN_FIELDS = {"sft": {"prompt": "string", "response": "string", **_IDS},  # what each objective reads
                "rwnll": {"prompt": "string", "response": "string", "reward?": "number", **_IDS},
                "dpo_nll": {"prompt": "string", "chosen": "string", "rejected": "string", **_IDS}}
SAMPLE_KEY = ("prompt_index", "sample_index")  # one record per sample: a repeated pair is refused


def _fits(value: Any, kind: str) -> bool:
    """Whether `value` is of `kind` (see KINDS): no bool for a number, finite numbers, ids >= 0."""
    if kind.endswith("|null"):
        return value is None or _fits(value, kind[:-5])
    if isinstance(value, bool) and kind != "any" or not isinstance(value, KINDS[kind][0]):
        return False
    if kind in ("ids", "numbers"):
        return all(_fits(x, "number") and (kind == "numbers" or isinstance(x, int) and x >= 0) for x in value)
    return value in FINISH_REASONS if kind == "finish" else not isinstance(value, float) or math.isfinite(value)


def check_record(record: dict, need: dict[str, str], where: str, prompts: int | None = None) -> None:
    """`need` maps field → kind (a `?` after the name: optional); `prompts` bounds `prompt_index`."""
    for name, kind in need.items():
        field, optional = name.rstrip("?"), name.endswith("?")
        if field not in record:
            if optional:
                continue
            raise UserError(f"{where}: the record has no '{field}' (needs: {', '.join(need)})")
        value = record[field]
        if not _fits(value, kind):
            words = KINDS[kind.removesuffix("|null")][1] + (" or null" if kind.endswith("|null") else "")
            words = "a finite number" if isinstance(value, float) and kind in ("number", "number|null") else words
            raise UserError(f"{where}: '{field}' must be {words}, got {json.dumps(value, default=str)[:60]}")
        if kind == "index" and value < 0 and not (field == "prompt_index" and prompts is not None):
            raise UserError(f"{where}: '{field}' must be an integer index >= 0, got {value}")
    index = record.get("prompt_index")
    if prompts is not None and "prompt_index" in need and not 0 <= index < prompts:
        raise UserError(f"{where}: prompt_index {index} is outside the {prompts} problems (0..{prompts - 1})")


def read_jsonl(path: str | Path, need: dict[str, str] | None = None, prompts: int | None = None,
               unique: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a whole JSONL file; a malformed line, or one without the fields in `need`
    (see `check_record`), or a second record with the same `unique` fields, is reported with its file and
    line number. Stage files (samples, scored) pass `unique=SAMPLE_KEY`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a JSONL file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return list(iter_jsonl_lines(Path(path), text, need, prompts, unique))


def iter_jsonl_lines(path: Path, text: str, need: dict[str, str] | None = None,
                     prompts: int | None = None, unique: tuple[str, ...] = ()) -> Iterator[dict]:
    """Parse complete JSONL lines, naming the file and line of the first bad one."""
    seen: dict[tuple, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON keeps U+2028, U+0085 raw
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if need:
            check_record(record, need, f"{path}:{lineno}", prompts)
        if unique and all(k in record for k in unique):
            key = tuple(json.dumps(record[k]) for k in unique)
            if key in seen:
                raise UserError(f"{path}:{lineno}: a second record for {', '.join(f'{k} {record[k]}' for k in unique)}"
                                f" (the first is line {seen[key]})")
            seen[key] = lineno
        yield record


class JsonlLog:
    """An append-only JSONL file that survives being killed mid-append."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self, need: dict[str, str] | None = None, prompts: int | None = None,
             unique: tuple[str, ...] = ()) -> list[dict]:
        """Complete records only, without modifying the file; checked as `read_jsonl` checks them."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        return self._parse(data[: data.rfind(b"\n") + 1], need, prompts, unique)

    def recover(self, need: dict[str, str] | None = None, prompts: int | None = None,
                unique: tuple[str, ...] = ()) -> list[dict]:
        """Every complete record, checked as in `read`; then a torn last line (a write cut off by a kill) is
        truncated away. A file whose lines are not such records is refused before anything in it changes."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        records = self._parse(data[:end], need, prompts, unique)
        if end < len(data):
            if not data[end:].startswith(b"{"):  # every record starts so: this tail is someone else's text
                raise UserError(f"{self.path}: its last line is not a record cut short; was the file written "
                                "by another program?")
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        return records

    def _parse(self, data: bytes, need, prompts, unique) -> list[dict]:
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: not UTF-8 text ({e.reason})") from None
        return list(iter_jsonl_lines(self.path, text, need, prompts, unique))

    def append(self, records: Iterable[dict]) -> None:
        """Append complete lines in one write, then fsync."""
        payload = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        if not payload:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(payload.encode())
            f.flush()
            os.fsync(f.fileno())


def check_writable(path: str | Path, *, folder: bool, what: str = "--out") -> Path:
    """`path` (a file or folder to be written) if it can be made; else one `UserError` naming it. Writes nothing.

    An existing file of the right kind may be written over (a stage rerun); what kind is right is the caller's
    check (`check_stage_out`)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kinds = ("a file", "a folder") if folder else ("a folder", "a file")
        raise UserError(f"{what} {path}: exists and is {kinds[0]}, not {kinds[1]}")
    if path.is_file() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path}: the file is not writable")
    up = path if path.is_dir() else path.parent  # a file is replaced by renaming a new one over it
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise UserError(f"{what} {path}: {up} is a file, so nothing can be made inside it")
    if not os.access(up, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {up} is not writable")
    return path


def check_stage_out(path: str | Path, need: dict[str, str], kind: str, what: str = "--out") -> Path:
    """`check_writable` for a stage's output file: one that exists must hold `kind` records (fields `need`),
    so a rerun replaces its own output, never another file. Reads only."""
    path = check_writable(path, folder=False, what=what)
    if path.is_file():
        try:
            read_jsonl(path, need, unique=SAMPLE_KEY)
        except UserError as e:
            raise UserError(f"{what} {path} exists and is not {kind} ({e}): delete it or choose another path") from None
    return path


class RunStore:
    """One experiment's directory: config, state, metrics and per-iteration artefacts; made on first write."""

    def __init__(self, root: str | Path):
        self.root = check_writable(root, folder=True, what="run folder")

    # -- layout ------------------------------------------------------------------------------------
    def path(self, *parts: str | int) -> Path:
        """A path inside the run directory; its parent folder is created."""
        p = self.root.joinpath(*map(str, parts))
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def iteration_dir(self, recipe: str, iteration: int) -> Path:
        d = self.root / recipe / f"iter_{iteration:02d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def jsonl(self, *parts: str | int) -> JsonlLog:
        return JsonlLog(self.path(*parts))

    # -- config ------------------------------------------------------------------------------------
    def check_config(self, config: dict, *, restart: bool = False) -> dict:
        """The normalised `config`, after refusing one that differs from the run's own; writes nothing.

        A run that never finished a stage (it failed on its first one) holds nothing worth keeping: a new
        config replaces it, as with `restart`.
        """
        config = json.loads(json.dumps(config, default=str))  # normalise tuples etc. before comparing
        old = None if restart else read_json(self.root / "config.json")
        if old is not None and old != config and self.state().get("done"):
            keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise UserError(
                f"run directory {self.root} was made by a different config (differs in: {', '.join(keys)}); "
                "use another directory, or pass --restart to delete it and start over"
            )
        return config

    def bind_config(self, config: dict, *, restart: bool = False) -> None:
        """Record the run's config, refusing to mix runs made by a different one.

        With `restart`, everything already in the directory is deleted first.
        """
        config = self.check_config(config, restart=restart)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make the run folder {self.root}: {e.strerror}") from None
        old = read_json(self.root / "config.json")
        if old is not None and old != config and not restart:
            print(f"{self.root}: no stage of its old config finished; starting over with this one", file=sys.stderr)
            restart = True
        if restart:
            for child in self.root.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        if read_json(self.root / "config.json") is None:
            atomic_write_json(self.root / "config.json", config)

    def config(self) -> dict | None:
        return read_json(self.root / "config.json")

    # -- state: which stages are finished ------------------------------------------------------------
    def state(self) -> dict:
        return read_json(self.root / "state.json", default={"done": {}})

    def is_done(self, stage: str) -> bool:
        return stage in self.state()["done"]

    def done_info(self, stage: str) -> Any:
        return self.state()["done"].get(stage)

    def mark_done(self, stage: str, info: Any = None) -> None:
        state = self.state()
        state["done"][stage] = info if info is not None else True
        atomic_write_json(self.root / "state.json", state)

    # -- metrics -----------------------------------------------------------------------------------
    @property
    def metrics(self) -> JsonlLog:
        return JsonlLog(self.root / "metrics.jsonl")

    def log_metrics(self, record: dict) -> None:
        self.metrics.append([record])
