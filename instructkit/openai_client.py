"""A small client for any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp, TGI, `instructkit serve`).

Used wherever instructkit talks to a served model: the judge (``evaluate/judge.py``) and synthetic data
generation. It does the few things such callers need and nothing else:

- ``chat(messages, **sampling) -> str`` (``POST {base_url}/chat/completions``) and
  ``complete(prompt, **sampling) -> str`` (``POST {base_url}/completions``);
- ``chat_many(...)``: many requests with at most ``concurrency`` in flight (a thread pool: the work is
  waiting on the network, and a thread pool keeps the API synchronous for callers);
- retries with exponential backoff and jitter on 429, 5xx, timeouts and connection errors, honouring
  ``Retry-After`` / ``retry-after-ms``;
- clear, non-retried errors for authentication failures (401/403: names the environment variable to
  set) and for a model or path that does not exist (404: lists the models the server offers);
- in a batch, those errors and a server that cannot be reached even after retries stop the batch at
  once, instead of every queued request failing the same way one by one.

The API key is read from an environment variable whose *name* is configurable (default
``OPENAI_API_KEY``). It is sent only in the ``Authorization`` header and is never written to logs,
error messages, reprs or outputs: every message built from server text passes through a redactor,
because some servers echo the key back in their error bodies.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import httpx

log = logging.getLogger("instructkit.openai_client")

#: Statuses worth another try: timeouts, conflicts, rate limits and every server-side error.
RETRY_STATUS = frozenset({408, 409, 429})


def _retryable(status: int) -> bool:
    return status in RETRY_STATUS or status >= 500


class OpenAIClientError(RuntimeError):
    """Base class: a request to an OpenAI-compatible endpoint failed."""


class AuthenticationError(OpenAIClientError):
    """401/403: the key is missing or wrong. Never retried."""


class NotFoundError(OpenAIClientError):
    """404: the model name or the URL path does not exist on the server. Never retried."""


class BadRequestError(OpenAIClientError):
    """Another 4xx: the server rejected this request (too long a prompt, an unknown parameter...)."""


class EndpointUnavailableError(OpenAIClientError):
    """Retries exhausted on 429/5xx, timeouts or connection errors."""


class ConnectionFailedError(EndpointUnavailableError):
    """Retries exhausted and the last attempt could not even connect: the server is down or the URL wrong."""


class ResponseFormatError(OpenAIClientError):
    """A 2xx answer that is not the JSON an OpenAI-compatible server returns."""


#: Errors after which every other request to the same endpoint would fail too; batches stop on them.
FATAL_ERRORS = (AuthenticationError, NotFoundError, ConnectionFailedError)


@dataclass
class Completion:
    """One answer: its text, why it ended (``stop``/``length``/...), token usage and the raw JSON."""

    text: str
    finish_reason: str | None
    usage: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class ClientStats:
    """Counters for reports: requests sent (attempts), retries, successes, failures, tokens."""

    attempts: int = 0
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class OpenAIClient:
    """Synchronous, thread-safe client for one model behind an OpenAI-compatible endpoint.

    Args:
        base_url: The API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``
            (paths such as ``/chat/completions`` are appended).
        model: Model name sent in every request.
        api_key_env: Name of the environment variable holding the key. An unset or empty variable
            sends no ``Authorization`` header (fine for local servers without a key).
        timeout: Seconds allowed for each attempt (connect, read, write and pool wait each).
        max_retries: Retries after the first attempt for retryable failures.
        concurrency: Default number of requests in flight in :meth:`chat_many`.
        backoff_base: First backoff in seconds; attempt k waits ``backoff_base * 2**k`` capped at
            ``backoff_max``, drawn uniformly from its upper half (jitter spreads retries of many
            threads apart).
        backoff_max: Longest wait between attempts, also the cap on a server's ``Retry-After``.
        default_sampling: Request fields used unless a call overrides them (e.g. ``temperature``).
        sleep: Called with the seconds to wait between attempts (tests pass a recorder).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 5, concurrency: int = 8,
                 backoff_base: float = 1.0, backoff_max: float = 60.0,
                 default_sampling: dict | None = None, sleep: Callable[[float], None] = time.sleep):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.default_sampling = dict(default_sampling or {})
        self.stats = ClientStats()
        self._sleep = sleep
        self._api_key = os.environ.get(api_key_env) or None
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=httpx.Timeout(timeout),
                                  limits=httpx.Limits(max_connections=max(concurrency, 1) * 2,
                                                      max_keepalive_connections=max(concurrency, 1)))

    def __repr__(self) -> str:
        key = "set" if self._api_key else "not set"
        return (f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r} ({key}), timeout={self.timeout}, "
                f"max_retries={self.max_retries}, concurrency={self.concurrency})")

    def describe(self) -> dict:
        """The settings, safe to write into reports (the key's variable name, never its value)."""
        return {"base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env,
                "api_key_set": bool(self._api_key), "timeout": self.timeout,
                "max_retries": self.max_retries, "concurrency": self.concurrency}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "OpenAIClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ requests

    def chat(self, messages: Sequence[dict], **sampling) -> str:
        """Text of the assistant's reply to ``messages`` (``[{"role", "content"}, ...]``)."""
        return self.chat_completion(messages, **sampling).text

    def chat_completion(self, messages: Sequence[dict], **sampling) -> Completion:
        """Like :meth:`chat` with the finish reason, usage and raw response."""
        payload = {"model": self.model, "messages": list(messages), **self.default_sampling, **sampling}
        data = self._post("/chat/completions", payload)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ResponseFormatError(self._redact(
                f"{self.base_url}/chat/completions answered without choices[0].message.content: "
                f"{str(data)[:300]}")) from None
        if text is None:
            raise ResponseFormatError(f"{self.base_url}/chat/completions returned no text content "
                                      f"(finish_reason {choice.get('finish_reason')!r})")
        return Completion(str(text), choice.get("finish_reason"), data.get("usage") or {}, data)

    def complete(self, prompt: str, **sampling) -> str:
        """Text continuing ``prompt`` through the legacy ``/completions`` endpoint."""
        payload = {"model": self.model, "prompt": prompt, **self.default_sampling, **sampling}
        data = self._post("/completions", payload)
        try:
            return str(data["choices"][0]["text"])
        except (KeyError, IndexError, TypeError):
            raise ResponseFormatError(self._redact(
                f"{self.base_url}/completions answered without choices[0].text: {str(data)[:300]}")) from None

    def chat_many(self, conversations: Sequence[Sequence[dict]], *, concurrency: int | None = None,
                  return_exceptions: bool = False,
                  on_result: Callable[[int, "str | OpenAIClientError"], None] | None = None,
                  **sampling) -> list["str | OpenAIClientError"]:
        """:meth:`chat` for many conversations with at most ``concurrency`` requests in flight.

        Args:
            conversations: One message list per request.
            concurrency: Requests in flight at once (default: the client's).
            return_exceptions: Put a failed request's :class:`OpenAIClientError` in its slot instead
                of raising. :data:`FATAL_ERRORS` (authentication, not found, cannot connect) always
                raise, since every other request would fail the same way; requests not yet started
                are cancelled.
            on_result: Called as ``on_result(index, text_or_error)`` as each request finishes (from
                the calling thread), e.g. to save progress.
            **sampling: Request fields for every call.

        Returns:
            Texts (or errors) in the order of ``conversations``.
        """
        n_workers = concurrency or self.concurrency
        results: list = [None] * len(conversations)
        stop = threading.Event()

        def one(i: int):
            if stop.is_set():
                return i, None
            try:
                return i, self.chat(conversations[i], **sampling)
            except OpenAIClientError as e:
                if isinstance(e, FATAL_ERRORS):
                    stop.set()  # workers skip what they have not started yet
                return i, e

        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="openai-client") as pool:
            pending = {pool.submit(one, i) for i in range(len(conversations))}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED, timeout=0.2)
                    for fut in done:
                        i, res = fut.result()
                        if res is None:  # skipped after a fatal error elsewhere in the batch
                            continue
                        if isinstance(res, FATAL_ERRORS) or (isinstance(res, OpenAIClientError)
                                                             and not return_exceptions):
                            raise res
                        results[i] = res
                        if on_result is not None:
                            on_result(i, res)
            except BaseException:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return results

    # ----------------------------------------------------------------------------------- internals

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _post(self, path: str, payload: dict) -> dict:
        url = self.base_url + path
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            with self._lock:
                self.stats.attempts += 1
            retry_after, refused = None, False
            try:
                resp = self._http.post(url, json=payload, headers=self._headers())
            except (httpx.TimeoutException, httpx.TransportError) as e:
                refused = isinstance(e, httpx.ConnectError)
                kind = "timed out" if isinstance(e, httpx.TimeoutException) else "connection failed"
                problem = self._redact(f"{kind} ({type(e).__name__}: {e})")
                if isinstance(e, httpx.TimeoutException):
                    problem += f" after {self.timeout:g}s"
            else:
                if resp.status_code < 300:
                    return self._parse_json(resp, url)
                if not _retryable(resp.status_code):
                    self._fail_fast(resp, url)
                problem = f"HTTP {resp.status_code}: {self._server_message(resp)}"
                retry_after = _retry_after_seconds(resp.headers)
            if attempt == attempts - 1:
                with self._lock:
                    self.stats.failed += 1
                if refused:
                    raise ConnectionFailedError(
                        f"POST {url} failed after {attempts} attempt(s); last error: {problem}. Fix: "
                        f"check that the server is running and that the base URL (host, port, /v1) is right")
                raise EndpointUnavailableError(
                    f"POST {url} failed after {attempts} attempt(s); last error: {problem}. "
                    f"Fix: check that the server is up and not overloaded, or raise --timeout / "
                    f"--max-retries / lower --concurrency")
            delay = self._backoff(attempt, retry_after)
            with self._lock:
                self.stats.retries += 1
            log.warning("POST %s: %s; retry %d/%d in %.2fs", url, problem, attempt + 1, self.max_retries,
                        delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max)
        cap = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        return self._rng.uniform(cap / 2, cap)

    def _parse_json(self, resp: httpx.Response, url: str) -> dict:
        try:
            data = resp.json()
        except ValueError:
            with self._lock:
                self.stats.failed += 1
            raise ResponseFormatError(self._redact(
                f"POST {url} answered HTTP {resp.status_code} with a body that is not JSON: "
                f"{resp.text[:200]!r}")) from None
        if not isinstance(data, dict):
            with self._lock:
                self.stats.failed += 1
            raise ResponseFormatError(f"POST {url} answered with JSON that is not an object")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        with self._lock:
            self.stats.succeeded += 1
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return data

    def _server_message(self, resp: httpx.Response) -> str:
        try:
            body = resp.json()
            err = body.get("error", body) if isinstance(body, dict) else body
            msg = err.get("message") or err.get("detail") or err if isinstance(err, dict) else err
        except ValueError:
            msg = resp.text
        return self._redact(str(msg)[:300])

    def _fail_fast(self, resp: httpx.Response, url: str) -> None:
        with self._lock:
            self.stats.failed += 1
        status, msg = resp.status_code, self._server_message(resp)
        if status in (401, 403):
            if self._api_key:
                fix = (f"the key in the environment variable {self.api_key_env} was rejected; set "
                       f"{self.api_key_env} to a valid key for this server (or name another variable "
                       f"with --api-key-env)")
            else:
                fix = (f"the environment variable {self.api_key_env} is not set; export "
                       f"{self.api_key_env}=<your key> (or name another variable with --api-key-env)")
            raise AuthenticationError(f"POST {url}: HTTP {status} authentication failed ({msg}). Fix: {fix}")
        if status == 404:
            models = self.list_models(quiet=True)
            offered = (f"the server offers: {', '.join(models)}" if models
                       else "GET /models did not list any models")
            raise NotFoundError(
                f"POST {url}: HTTP 404 ({msg}). Either the model {self.model!r} does not exist there "
                f"({offered}) or the base URL is wrong (it usually ends in /v1, e.g. "
                f"http://127.0.0.1:8000/v1). Fix: pass a listed model name or the right base URL")
        raise BadRequestError(f"POST {url}: HTTP {status}: {msg}")

    def list_models(self, quiet: bool = False) -> list[str]:
        """Model ids from ``GET {base_url}/models``; with ``quiet``, [] on any failure."""
        try:
            resp = self._http.get(self.base_url + "/models", headers=self._headers(),
                                  timeout=min(self.timeout, 10.0))
            resp.raise_for_status()
            return [str(m.get("id")) for m in resp.json().get("data", []) if isinstance(m, dict)]
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            if quiet:
                return []
            raise OpenAIClientError(self._redact(f"GET {self.base_url}/models failed: {e}")) from None


def _retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date), or None."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
