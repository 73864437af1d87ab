"""Text generators for synthesis: a local Hugging Face model, any OpenAI-compatible endpoint, or a function.

All three take a batch of requests and return one :class:`GenResult` per request, in order. A request
is either raw text (a completion-style prompt, as Self-Instruct uses with a plain LM) or a chat
(list of messages, as sequence-level distillation uses with an instruction-tuned teacher).

- :class:`LocalGenerator`: batched KV-cache sampling (``instructkit.generate``); text prompts are
  tokenised as they are, chats are rendered with the model's chat template.
- :class:`EndpointGenerator`: :class:`instructkit.openai_client.OpenAIClient` (retries with backoff on
  429/5xx, timeout, API key from an environment variable and never written anywhere), at most
  ``concurrency`` requests in flight. Text prompts go to ``/chat/completions`` as one user message
  (``api="chat"``, default: what every server offers) or to ``/completions`` (``api="completions"``).
  A request that still fails after retries becomes a failed result (counted by callers); failures
  that would hit every request (authentication, unknown model, unreachable server) stop the run.
- :class:`FunctionGenerator`: wraps ``fn(request, sampling) -> str | GenResult``, for tests and
  custom backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class Sampling:
    """Sampling settings common to every backend."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenResult:
    """One completion: its text, why it ended (``stop``/``length``/None if unknown), or the error."""

    text: str
    finish_reason: str | None = None
    error: str | None = None


class Generator:
    """Interface: ``generate(requests, sampling) -> list[GenResult]`` and ``describe() -> dict``."""

    name: str = "generator"

    def generate(self, requests: Sequence, sampling: Sampling) -> list[GenResult]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": type(self).__name__, "name": self.name}

    def close(self) -> None:
        pass


class FunctionGenerator(Generator):
    """``fn(request, sampling)`` returning text or a :class:`GenResult`, called once per request."""

    def __init__(self, fn: Callable, name: str = "function"):
        self.fn, self.name = fn, name

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            res = self.fn(r, sampling)
            out.append(res if isinstance(res, GenResult) else GenResult(str(res), "stop"))
        return out


class LocalGenerator(Generator):
    """A local causal LM folder (optionally with a LoRA adapter)."""

    def __init__(self, model_dir: str | Path, adapter: str | Path | None = None, batch_size: int = 8):
        from instructkit.models import load_for_inference

        self.model, self.tokenizer = load_for_inference(model_dir, adapter)
        self.name = str(Path(adapter or model_dir).resolve())
        self.batch_size = batch_size
        cfg = self.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.truncated_prompts = 0

    def describe(self) -> dict:
        return {"kind": "local", "name": self.name, "context": self.context}

    def _ids(self, request, max_tokens: int) -> list[int]:
        if isinstance(request, str):
            ids = self.tokenizer(request)["input_ids"]
        else:
            from instructkit.data.encode import encode_prompt

            ids = encode_prompt(self.tokenizer, request, template=self.tokenizer.chat_template)
        room = self.context - max_tokens
        if len(ids) > room:
            # Keep the end: the prompt's last lines say what to continue.
            self.truncated_prompts += 1
            ids = ids[len(ids) - max(1, room):]
        return ids

    def generate(self, requests, sampling):
        from instructkit.generate import SamplingConfig, add_end_of_turn_stops, generate

        if any(not isinstance(r, str) for r in requests):
            add_end_of_turn_stops(self.model, self.tokenizer)
        max_new = min(sampling.max_tokens, max(1, self.context // 2))
        cfg = SamplingConfig(max_new_tokens=max_new, temperature=sampling.temperature, top_p=sampling.top_p,
                             stop=list(sampling.stop), seed=sampling.seed)
        ids = [self._ids(r, max_new) for r in requests]
        gens = generate(self.model, self.tokenizer, ids, cfg, batch_size=self.batch_size)
        return [GenResult(g.text, g.finish_reason) for g in gens]


class EndpointGenerator(Generator):
    """An OpenAI-compatible endpoint: base URL, model name, key from an environment variable."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 api: str = "chat", concurrency: int = 8, timeout: float = 120.0, max_retries: int = 5,
                 client=None):
        from instructkit.openai_client import OpenAIClient

        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.api = api
        self.client = client or OpenAIClient(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                             max_retries=max_retries, concurrency=concurrency)
        self.name = f"{self.client.base_url}#{model}"

    def describe(self) -> dict:
        return {"kind": "endpoint", "api": self.api, **self.client.describe()}

    def close(self) -> None:
        self.client.close()

    def _one(self, request, params: dict) -> GenResult:
        from instructkit.openai_client import FATAL_ERRORS, OpenAIClientError

        try:
            if isinstance(request, str) and self.api == "completions":
                return GenResult(self.client.complete(request, **params), None)
            messages = [{"role": "user", "content": request}] if isinstance(request, str) else list(request)
            c = self.client.chat_completion(messages, **params)
            return GenResult(c.text, c.finish_reason)
        except FATAL_ERRORS:
            raise
        except OpenAIClientError as e:
            return GenResult("", None, error=str(e))

    def generate(self, requests, sampling):
        params = {"max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.stop:
            params["stop"] = list(sampling.stop)[:4]  # the OpenAI API takes at most 4 stop strings
        if sampling.seed is not None:
            params["seed"] = sampling.seed
        results: list = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=self.client.concurrency, thread_name_prefix="synth") as pool:
            futures = {pool.submit(self._one, r, params): i for i, r in enumerate(requests)}
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise fut.exception()
                results[futures[fut]] = fut.result()
        return results


def is_url(spec: str) -> bool:
    return str(spec).startswith(("http://", "https://"))


def make_generator(spec: str, *, model_name: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                   api: str = "chat", concurrency: int = 8, timeout: float = 120.0, max_retries: int = 5,
                   adapter: str | None = None, batch_size: int = 8) -> Generator:
    """A local model folder or an ``http(s)://`` base URL (which then needs ``model_name``)."""
    if is_url(spec):
        if not model_name:
            raise ValueError(f"--model-name is required with an endpoint URL ({spec}): the model name the "
                             f"server expects (GET {spec.rstrip('/')}/models lists them)")
        return EndpointGenerator(spec, model_name, api_key_env=api_key_env, api=api, concurrency=concurrency,
                                 timeout=timeout, max_retries=max_retries)
    if not Path(spec).exists():
        raise ValueError(f"generator '{spec}' is neither an http(s):// URL nor an existing model folder")
    return LocalGenerator(spec, adapter=adapter, batch_size=batch_size)
