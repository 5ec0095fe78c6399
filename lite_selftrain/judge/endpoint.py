"""A fixed model on an OpenAI-compatible server (`vllm serve`, llama.cpp's server, a hosted API), reached through
the `openai` client package: the judge of every iterate, or self-rewarding's prompt writer.

    judge_model = "openai:<model>@<base_url>"        e.g. "openai:gpt-4o@https://api.openai.com/v1"
    endpoint = Endpoint("openai:smollm2@http://127.0.0.1:8000/v1", EndpointConfig(), ledger="run/judgments.jsonl")
    endpoint.check()                                  # key set, server reachable, model served: else one line
    replies = endpoint.chat(prompts, SamplingConfig(n=3, temperature=0.7))   # [P][n] Reply, text None if missing

The API key is read from the environment variable `EndpointConfig.api_key_env`, never from a config file, and
is written nowhere. Requests run on up to `max_concurrency` threads; the client retries rate limits (429),
server errors (5xx), timeouts and lost connections with exponential backoff (`max_retries`). Every reply is
appended to the ledger (append-only JSONL) the moment it arrives, keyed by a hash of (endpoint, prompt,
sampling, sample index), so a killed run that resumes asks only for what is missing and pays nothing twice.

Failures: a reply that is not a chat completion, or a request the server refuses as malformed (400), is a
missing reply (recorded in the answer, not the ledger: a resume asks again); a server that stays down or
rate-limited after the retries, or refuses the key, stops the run with one line, after every reply that had
arrived is in the ledger. Under a launcher (torchrun) rank 0 alone asks; the other ranks receive its texts.
Simplification: one request per sample (n = 1 each; llama.cpp's server ignores n), seeded with sample.seed + j.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from .. import distributed as dist
from ..config import PositiveInt, check_fields
from ..errors import UserError
from ..sampling import SamplingConfig
from ..store import JsonlLog

PREFIX = "openai:"  # how a model name says it is a model on a server
LEDGER_FIELDS = {"key": "string", "endpoint": "string", "text": "string"}
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "reused", "missing")  # a stage's `judge_tokens`


@dataclass
class EndpointConfig:
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (the openai client's own)
    max_concurrency: PositiveInt = 8  # requests in flight at once: enough to keep a local server busy, few
    # enough to stay under a hosted API's rate limit on a first try
    timeout_s: float = 120.0  # one request's limit: a 256-token judgment takes seconds on a served model
    max_retries: int = 5  # the client's retries on 429, 5xx, timeouts and lost connections, backing off
    # exponentially (0.5 s doubling to 8 s): about half a minute of a server's hiccup is ridden out

    def __post_init__(self):
        check_fields(self)
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise UserError("endpoint.timeout_s must be > 0 and endpoint.max_retries >= 0")


def is_endpoint(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def parse_endpoint(name: str) -> tuple[str, str]:
    """(model, base_url) of "openai:<model>@<base_url>" (the last "@" splits them); else one line."""
    model, _, url = name[len(PREFIX):].rpartition("@")
    if not model or not url.startswith(("http://", "https://")):
        raise UserError(f"'{name}' names no endpoint: write openai:<model>@<base_url>, "
                        "e.g. openai:gpt-4o@https://api.openai.com/v1")
    return model, url.rstrip("/")


@dataclass
class Reply:
    text: str | None  # None: missing (see `error`)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # why it is missing
    reused: bool = False  # read from the ledger, not paid for in this process


def request_key(endpoint: str, prompt: str, sampling: SamplingConfig, index: int) -> str:
    """The ledger's key of one request: what decides its reply, hashed."""
    what = [endpoint, prompt, sampling.temperature, sampling.top_p, sampling.max_new_tokens, list(sampling.stop),
            sampling.seed + index, index]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()[:32]


class Endpoint:
    """One model on an OpenAI-compatible server, with the ledger of what it has answered."""

    def __init__(self, name: str, cfg: EndpointConfig | None = None, *, ledger: str | Path | None = None):
        self.cfg = cfg or EndpointConfig()
        self.name = name
        self.model, self.base_url = parse_endpoint(name)
        self.id = f"{self.model}@{self.base_url}"  # what records name it by: never the key
        key = os.environ.get(self.cfg.api_key_env)
        if not key:
            raise UserError(f"{name}: set the API key in the environment variable {self.cfg.api_key_env} "
                            f"(a local server without a key takes any value: {self.cfg.api_key_env}=none)")
        import openai  # the `judge` extra

        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.cfg.timeout_s,
                                    max_retries=self.cfg.max_retries)
        self.ledger = JsonlLog(ledger) if ledger else None
        self.tokens = Counter(dict.fromkeys(COUNTS, 0))  # requests this process made; tokens of every reply

    def check(self) -> None:
        """Before anything is paid for: the key is accepted, the server answers and serves `model`."""
        try:
            served = [m.id for m in self.client.with_options(max_retries=1).models.list()]
        except Exception as e:
            raise UserError(f"judge endpoint {self.base_url}: {failure(e, self.cfg.api_key_env)}") from None
        if self.model not in served:
            raise UserError(f"{self.base_url} does not serve model '{self.model}' (it serves: "
                            f"{', '.join(served[:8]) or 'nothing'})")

    def chat(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Reply]]:
        """sampling.n replies to each prompt (as a user message): [P][n], from the ledger where it has them."""
        known = {r["key"]: r for r in self.ledger.recover(LEDGER_FIELDS)} if self.ledger else {}
        out: list[list[Reply | None]] = [[None] * sampling.n for _ in prompts]
        todo: dict[str, list[tuple[int, int]]] = {}  # key -> the places its reply goes: the same request, once
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                key = request_key(self.id, prompt, sampling, j)
                if key in known:  # bought before a kill: its tokens still count as this stage's cost
                    kept = known[key]
                    out[i][j] = Reply(kept["text"], kept.get("prompt_tokens", 0), kept.get("completion_tokens", 0),
                                      reused=True)
                    self.tokens.update(reused=1, prompt_tokens=out[i][j].prompt_tokens,
                                       completion_tokens=out[i][j].completion_tokens)
                else:
                    todo.setdefault(key, []).append((i, j))
        places = list(todo.values())
        for where, reply in zip(places, self._ask([(prompts[w[0][0]], w[0][1]) for w in places], sampling)):
            for i, j in where:
                out[i][j] = reply
        return out

    def texts(self, prompts: list[str], sampling: SamplingConfig) -> list[list[str | None]]:
        """The texts of `chat`: [P][n], None where missing. Under a launcher rank 0 alone asks (and pays), and
        hands the texts to every rank."""
        asked = [[r.text for r in group] for group in self.chat(prompts, sampling)] if dist.is_main() else None
        return dist.broadcast(asked)

    def _ask(self, requests: list[tuple[str, int]], sampling: SamplingConfig) -> list[Reply]:
        """The replies to `requests` (prompt, sample index), each written to the ledger as it arrives; a
        fatal failure is raised once the requests in flight have ended."""
        replies: list[Reply | None] = [None] * len(requests)
        fatal = None
        with ThreadPoolExecutor(self.cfg.max_concurrency) as pool:
            futures = {pool.submit(self._one, p, sampling, j): n for n, (p, j) in enumerate(requests)}
            for future in as_completed(futures):
                try:
                    reply = future.result()
                except CancelledError:
                    continue
                except Exception as e:  # the retries are spent: stop asking, keep what arrives
                    fatal = fatal or e
                    for other in futures:
                        other.cancel()
                    continue
                replies[futures[future]] = reply
                self._record(reply, requests[futures[future]], sampling)
        if fatal is not None:
            kept = f"; the replies received are kept in {self.ledger.path}" if self.ledger else ""
            raise UserError(f"judge endpoint {self.base_url}: {failure(fatal, self.cfg.api_key_env)}{kept}")
        return replies

    def _record(self, reply: Reply, request: tuple[str, int], sampling: SamplingConfig) -> None:
        self.tokens["requests"] += 1
        self.tokens["prompt_tokens"] += reply.prompt_tokens
        self.tokens["completion_tokens"] += reply.completion_tokens
        if reply.text is None:
            self.tokens["missing"] += 1
        elif self.ledger:
            self.ledger.append([{"key": request_key(self.id, request[0], sampling, request[1]),
                                 "endpoint": self.id, "text": reply.text, "prompt_tokens": reply.prompt_tokens,
                                 "completion_tokens": reply.completion_tokens}])

    def _one(self, prompt: str, sampling: SamplingConfig, index: int) -> Reply:
        """One request; a reply that is no chat completion, or a request refused as malformed, is missing."""
        import openai

        try:
            done = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], n=1,
                temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None, seed=sampling.seed + index)
        except (openai.BadRequestError, openai.UnprocessableEntityError, openai.APIResponseValidationError) as e:
            return Reply(None, error=failure(e, self.cfg.api_key_env))
        try:
            text = done.choices[0].message.content
            usage = done.usage
            tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        except (AttributeError, IndexError, TypeError):
            return Reply(None, error="malformed reply: no chat completion in it")
        if not isinstance(text, str):
            return Reply(None, error="malformed reply: no text in its message")
        return Reply(text, *tokens)


def failure(error: BaseException, key_env: str) -> str:
    """One line for an openai client error."""
    import openai

    if isinstance(error, openai.AuthenticationError):
        return f"the server refused the API key in {key_env}"
    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):
        return f"cannot reach the server ({type(error).__name__}: {' '.join(str(error).split())[:160]})"
    if isinstance(error, openai.RateLimitError):
        return "still rate-limited (429) after the retries: lower endpoint.max_concurrency or wait"
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {' '.join(str(error.message).split())[:200]}"
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
