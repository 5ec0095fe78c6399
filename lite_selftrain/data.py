"""Reading example records: a local JSONL file, a `datasets` dataset saved to disk, or a hub name.

Everything comes back as a list of plain dicts. Local sources need no network; a hub name is tried
only as a last resort and, offline, fails with a message that says how to pass a local file instead.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .store import check_record, read_jsonl


def _load_saved_dataset(path: Path, split: str | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{path}: not a saved `datasets` dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise UserError(f"{path}: no split {split!r} (has: {', '.join(ds)})")
        ds = ds[split]
    return [dict(r) for r in ds]


def _load_hub(name: str, split: str | None, config: str | None) -> list[dict]:
    import datasets

    how = "pass a local file instead: a .jsonl file or a folder written by Dataset.save_to_disk"
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise UserError(f"could not load dataset '{name}' from the hub ({type(e).__name__}); {how}") from None
    return [dict(r) for r in ds]


def load_records(source: str | Path, split: str | None = "train", *, config: str | None = None,
                 need: dict[str, str] | None = None) -> list[dict]:
    """Records from `source`: a JSONL file, a saved dataset folder, or (online) a hub dataset name.

    `need` (field → kind, see `store.check_record`) names the first record without them: file:line or index.
    """
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        return _nonempty(read_jsonl(path, need), source)
    elif path.is_dir():
        records = _load_saved_dataset(path, split)
    elif str(source).startswith((".", "/", "~")):
        raise UserError(f"data path not found: {source}")
    else:
        records = _load_hub(str(source), split, config)
    for i, record in enumerate(records if need else []):
        check_record(record, need, f"{source} record {i}")
    return _nonempty(records, source)


def _nonempty(records: list[dict], source) -> list[dict]:
    if not records:
        raise UserError(f"dataset {source} is empty")
    return records
