"""The endpoint judge against a real local HTTP server speaking the OpenAI protocol (tests/openai_server.py):
start-up errors in one line, replies kept as they arrive and never asked for twice, and the failure paths
(429, 5xx, a malformed reply, a score that does not parse, a server that goes down). The same paths against
`vllm serve` itself: tests/test_judge_vllm.py."""

import importlib.util
import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="the `judge` extra")

from lite_selftrain.config import from_dict  # noqa: E402
from lite_selftrain.errors import UserError  # noqa: E402
from lite_selftrain.judge import Endpoint, EndpointConfig, JudgeConfig, judge, rubric  # noqa: E402
from lite_selftrain.judge.endpoint import parse_endpoint  # noqa: E402
from lite_selftrain.recipes import centrality  # noqa: E402

_spec = importlib.util.spec_from_file_location("openai_server", Path(__file__).parent / "openai_server.py")
openai_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(openai_server)

FAST = EndpointConfig(max_concurrency=3, timeout_s=10, max_retries=2)
PAIRS = [(f"Say {w} twice.", f"{w} {w}") for w in ("apple", "pear", "plum", "fig")]


def scorer(prompt: str) -> str:
    """A judge whose score is the reply's length in words, capped at 5 (unparsable for 'fig')."""
    reply = prompt.split("Reply:\n", 1)[1].split("\n\n", 1)[0] if "Reply:\n" in prompt else prompt
    return "No verdict." if "fig" in reply else f"Looks fine.\nScore: {min(len(reply), 5)}"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    with openai_server.OpenAIServer(reply=scorer) as s:
        yield s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ledger_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_names_and_settings():
    assert parse_endpoint("openai:gpt-4o@https://api.openai.com/v1/") == ("gpt-4o", "https://api.openai.com/v1")
    assert parse_endpoint("openai:org/m@name@http://h:8000/v1") == ("org/m@name", "http://h:8000/v1")
    for bad in ("openai:gpt-4o", "openai:@http://h/v1", "openai:m@ftp://h"):
        with pytest.raises(UserError, match="openai:<model>@<base_url>"):
            parse_endpoint(bad)
    cfg = from_dict(centrality.CentralityConfig, {"endpoint": {"max_concurrency": 2, "timeout_s": 5}})
    assert cfg.endpoint.max_concurrency == 2 and cfg.rubrics == ("quality", "safety")
    with pytest.raises(UserError, match="unknown rubric 'kindness'"):
        from_dict(centrality.CentralityConfig, {"rubrics": ["kindness"]})
    assert "{prompt}" in rubric("safety") and "安全" in rubric("safety") and "品質" in rubric("quality")


def test_start_up_errors_are_one_line(server, monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    errors = []
    with pytest.raises(UserError) as e:
        Endpoint(f"openai:judge@{server.url}", EndpointConfig(api_key_env="MY_JUDGE_KEY"))
    errors.append(str(e.value))
    with pytest.raises(UserError) as e:
        Endpoint(f"openai:judge@http://127.0.0.1:{free_port()}/v1", FAST).check()
    errors.append(str(e.value))
    with pytest.raises(UserError) as e:
        Endpoint(f"openai:gpt-9@{server.url}", FAST).check()
    errors.append(str(e.value))
    assert "MY_JUDGE_KEY" in errors[0] and "cannot reach" in errors[1] and "does not serve model 'gpt-9'" in errors[2]
    assert "judge" in errors[2] and all("\n" not in m for m in errors)
    Endpoint(f"openai:judge@{server.url}", FAST).check()  # the served model passes
    assert server.chats == []  # nothing was paid for


def test_judgments_are_kept_as_they_arrive_and_never_asked_twice(server, tmp_path):
    cfg = JudgeConfig(sample=JudgeConfig().sample.replace(n=2))
    first = Endpoint(f"openai:judge@{server.url}", FAST, ledger=tmp_path / "j.jsonl")
    verdicts = judge(first, None, PAIRS[:2], cfg)
    assert [v.scores for v in verdicts] == [[5.0, 5.0], [5.0, 5.0]]  # "apple apple" is 11 characters
    assert len(server.chats) == 4 and len(ledger_lines(tmp_path / "j.jsonl")) == 4
    assert {r["endpoint"] for r in ledger_lines(tmp_path / "j.jsonl")} == {f"judge@{server.url}"}
    assert "none" not in (tmp_path / "j.jsonl").read_text()  # the key is written nowhere
    again = Endpoint(f"openai:judge@{server.url}", FAST, ledger=tmp_path / "j.jsonl")
    verdicts = judge(again, None, PAIRS, cfg)  # two pairs known, two new
    assert len(server.chats) == 8 and again.tokens["reused"] == 4 and again.tokens["requests"] == 4
    assert verdicts[3].texts == ["No verdict.", "No verdict."] and verdicts[3].score is None  # 'fig': unparsable
    assert len(ledger_lines(tmp_path / "j.jsonl")) == 8  # an unparsable judgment was paid for: it is kept
    assert again.tokens["prompt_tokens"] > 0 and again.tokens["completion_tokens"] > 0 and again.tokens["missing"] == 0
    reread = Endpoint(f"openai:judge@{server.url}", FAST, ledger=tmp_path / "j.jsonl")
    judge(reread, None, PAIRS[:2], cfg)  # all four known: nothing asked, and what they cost is still reported
    assert len(server.chats) == 8 and reread.tokens["requests"] == 0 and reread.tokens["reused"] == 4
    paid = ("prompt_tokens", "completion_tokens")
    assert [reread.tokens[k] for k in paid] == [first.tokens[k] for k in paid] and first.tokens["prompt_tokens"] > 0
    # the sampling settings are part of what was asked: other settings are other judgments; the same pair twice
    # in one call is asked for once
    judge(again, None, PAIRS[:1] * 2, JudgeConfig(sample=cfg.sample.replace(n=1, temperature=0.0)))
    assert len(server.chats) == 9


def test_a_rate_limit_or_server_error_is_retried(server, tmp_path):
    server.faults.extend(["429", "500"])
    endpoint = Endpoint(f"openai:judge@{server.url}", EndpointConfig(max_concurrency=1, max_retries=2),
                        ledger=tmp_path / "j.jsonl")
    verdicts = judge(endpoint, None, PAIRS[:1], JudgeConfig(sample=JudgeConfig().sample.replace(n=1)))
    assert verdicts[0].score == 5.0 and len(server.chats) == 3 and len(server.answered) == 1


def test_malformed_replies_are_missing_and_asked_again(server, tmp_path):
    server.faults.extend(["malformed", "no_choices"])
    one = JudgeConfig(sample=JudgeConfig().sample.replace(n=1))
    endpoint = Endpoint(f"openai:judge@{server.url}", EndpointConfig(max_concurrency=1), ledger=tmp_path / "j.jsonl")
    verdicts = judge(endpoint, None, PAIRS[:3], one)
    assert [v.score for v in verdicts] == [None, None, 5.0] and [v.texts[0] for v in verdicts[:2]] == [None, None]
    assert endpoint.tokens["missing"] == 2 and len(ledger_lines(tmp_path / "j.jsonl")) == 1
    verdicts = judge(endpoint, None, PAIRS[:3], one)  # a resume asks only for the two that never arrived
    assert [v.score for v in verdicts] == [5.0, 5.0, 5.0] and len(server.chats) == 5


def test_a_server_that_stays_down_stops_the_run_keeping_what_arrived(server, tmp_path):
    server.faults.extend(["429"] * 20)
    endpoint = Endpoint(f"openai:judge@{server.url}", EndpointConfig(max_concurrency=1, max_retries=1),
                        ledger=tmp_path / "j.jsonl")
    with pytest.raises(UserError, match="still rate-limited") as e:
        judge(endpoint, None, PAIRS, JudgeConfig())
    assert "\n" not in str(e.value) and str(tmp_path / "j.jsonl") in str(e.value)
    server.faults.clear()
    judge(endpoint, None, PAIRS[:1], JudgeConfig(sample=JudgeConfig().sample.replace(n=1)))
    kept = ledger_lines(tmp_path / "j.jsonl")
    server.stop()  # down for good: the judgments already paid for stay in the ledger
    with pytest.raises(UserError, match="cannot reach"):
        judge(endpoint, None, PAIRS, JudgeConfig())
    assert ledger_lines(tmp_path / "j.jsonl") == kept and len(kept) == 1


def test_a_centrality_run_refuses_a_missing_key_before_sampling(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in "abcdefgh"))
    cfg = from_dict(centrality.CentralityConfig, {"data_path": str(data), "eval_size": 2, "model": {"name": "tiny"},
                                                  "judge_model": "openai:judge@http://127.0.0.1:9/v1"})
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        centrality.run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing sampled, no folder bound


def test_a_prompt_writer_on_a_server_writes_self_rewarding_prompts(monkeypatch, tmp_path):
    from lite_selftrain.recipes.self_rewarding import SelfRewardConfig, write_prompts

    monkeypatch.setenv("OPENAI_API_KEY", "none")
    with openai_server.OpenAIServer(reply=lambda prompt: "Task: Name a river.") as server:
        writer = Endpoint(f"openai:judge@{server.url}", FAST, ledger=tmp_path / "w.jsonl")
        cfg = SelfRewardConfig(new_prompts=2, prompt_shots=2, no_eft=True)
        seeds = ["Say hi.", "Count to 3.", "Name a fruit.", "Spell cat."]
        kept, info = write_prompts(writer, None, seeds, cfg, 1, tmp_path / "raw.jsonl")
        assert kept == [{"prompt": "Name a river."}]  # the chat model's "Task:" label is not part of the prompt
        assert info["prompts_dropped"] == {"empty": 0, "repeated": 1}
        assert all(body["stop"] == ["\n"] and body["max_tokens"] == cfg.write.max_new_tokens for body in server.chats)
        asked = len(server.chats)
        assert write_prompts(writer, None, seeds, cfg, 1, tmp_path / "raw.jsonl")[0] == kept  # resumed: from the
        assert len(server.chats) == asked  # ledger, nothing asked again
