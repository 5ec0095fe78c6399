"""The run store: atomic files, JSONL that survives a kill, config binding, stage state."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.store import JsonlLog, RunStore, atomic_write_json, read_json, read_jsonl, write_jsonl

WRITER = textwrap.dedent(
    """
    import sys
    from lite_selftrain.store import JsonlLog
    log = JsonlLog(sys.argv[1])
    start = len(log.recover())
    i = start
    print("ready", flush=True)
    while True:  # batches of large records widen the window in which a kill tears a line
        log.append([{"id": i + j, "pad": "x" * 200_000} for j in range(8)])
        i += 8
    """
)


def _ids(records):
    return [r["id"] for r in records]


def test_torn_last_line_is_dropped_and_file_repaired(tmp_path):
    path = tmp_path / "s.jsonl"
    log = JsonlLog(path)
    log.append([{"id": 0}, {"id": 1}])
    with open(path, "ab") as f:
        f.write(b'{"id": 2, "te')  # a write cut off by a kill
    assert _ids(log.read()) == [0, 1]
    assert _ids(log.recover()) == [0, 1]
    assert path.read_bytes().endswith(b"}\n")
    log.append([{"id": 2}])
    assert _ids(log.recover()) == [0, 1, 2]


def test_texts_with_unicode_line_separators_read_back(tmp_path):
    """JSON writes U+2028, U+2029 and U+0085 unescaped: they are inside a line, not line ends."""
    records = [{"text": "a\u2028b\u2029c\x85d"}, {"text": "e"}]
    log = JsonlLog(tmp_path / "s.jsonl")
    log.append(records)
    assert log.recover() == records and log.read() == records
    assert read_jsonl(tmp_path / "s.jsonl") == records


def test_complete_but_corrupt_line_is_an_error_with_line_number(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(UserError, match=r"s.jsonl:2"):
        JsonlLog(path).recover()


@pytest.mark.parametrize("delay", [0.3, 0.7])
def test_killed_writer_resumes_with_every_record_exactly_once(tmp_path, delay):
    path = tmp_path / "s.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for _round in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ids = _ids(JsonlLog(path).recover())
    assert len(ids) > 0
    assert ids == list(range(len(ids)))  # complete, in order, no duplicates, nothing torn kept
    assert path.read_bytes().endswith(b"\n")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert read_json(tmp_path / "a.json") == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_run_store_binds_config_and_refuses_a_different_one(tmp_path):
    store = RunStore(tmp_path / "run")
    store.bind_config({"lr": 1e-4, "steps": [1, 2]})
    store.bind_config({"lr": 1e-4, "steps": (1, 2)})  # same config: fine
    (tmp_path / "run" / "partial.jsonl").write_text("{}\n")
    store.bind_config({"lr": 3e-4, "steps": [1, 2]})  # no stage finished yet: the new config replaces it
    assert store.config() == {"lr": 3e-4, "steps": [1, 2]} and not (tmp_path / "run" / "partial.jsonl").exists()
    store.mark_done("sample/0", {"n": 3})
    with pytest.raises(UserError, match="different config.*lr"):
        store.bind_config({"lr": 2e-4, "steps": [1, 2]})
    store.bind_config({"lr": 2e-4}, restart=True)
    assert store.config() == {"lr": 2e-4}
    assert not store.is_done("sample/0")


def test_stage_state_and_metrics(tmp_path):
    store = RunStore(tmp_path)
    assert not store.is_done("train/1")
    store.mark_done("train/1", {"loss": 0.5})
    assert RunStore(tmp_path).done_info("train/1") == {"loss": 0.5}
    store.log_metrics({"iteration": 0, "acc": 0.1})
    store.log_metrics({"iteration": 1, "acc": 0.2})
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_write_jsonl_replaces_the_whole_file(tmp_path):
    path = tmp_path / "d.jsonl"
    JsonlLog(path).append([{"id": 9}])
    write_jsonl(path, [{"id": 0, "text": "日本"}, {"id": 1}])
    assert JsonlLog(path).read() == [{"id": 0, "text": "日本"}, {"id": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_sweep_removes_temporaries_of_stopped_processes_only(tmp_path, capsys):
    from lite_selftrain.store import atomic_dir, atomic_write_bytes, sweep_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    alive = str(os.getppid())  # a running process that is not this one
    (tmp_path / "iter_01").mkdir()
    stale_dir = tmp_path / "iter_01" / f".lite-tmp.{dead}.model.x1"
    (stale_dir / "inner").mkdir(parents=True)
    (stale_dir / "inner" / f".lite-tmp.{dead}.nested.x2").write_text("x")
    stale_file = tmp_path / f".lite-tmp.{dead}.state.json.x3"
    stale_file.write_text("{")
    running = tmp_path / f".lite-tmp.{alive}.checkpoint.pt.x4"
    running.write_text("being written")
    lookalike = tmp_path / ".lite-tmp.notapid.x5"
    lookalike.write_text("not ours")
    atomic_write_bytes(tmp_path / "kept.bin", b"data")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "f").write_text("y")
    removed = sweep_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_dir, stale_file])  # the nested entry went with its folder
    assert running.exists() and lookalike.exists() and not stale_dir.exists()
    assert (tmp_path / "kept.bin").read_bytes() == b"data" and (tmp_path / "folder" / "f").read_text() == "y"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "removed 2 temporary entries" in err[0]
    assert sweep_temporaries(tmp_path) == [] and capsys.readouterr().err == ""
    with atomic_dir(tmp_path / "folder") as tmp:  # replacing a folder leaves only the new one
        (tmp / "g").write_text("z")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lite-tmp.")) == sorted(
        [running.name, lookalike.name])
