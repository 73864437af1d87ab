"""OpenAI-compatible HTTP server for a tuned model (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming over server-sent
events or not), ``GET /v1/models``, ``GET /health``.

One worker thread owns the model. Request handlers validate and tokenize, then queue a job; the
worker takes the oldest job plus every other waiting job with compatible sampling settings (up to
``max_batch`` sequences) and decodes them together with :func:`instructkit.generate.generate`.
Tokens reach streaming clients as they are picked, from inside the shared batch. A request with a
``seed`` decodes in a batch of its own, so the same seed gives the same text whatever else is queued.

Everything a client sends is bounded (body size, ``max_tokens``, ``n``, stop strings, queue
length) and every refusal is an OpenAI-style JSON error with a 4xx status. This module imports no
training code (``loop``, ``losses``, ``methods``).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructkit.generate import Generation, SamplingConfig, StreamDecoder, add_end_of_turn_stops, generate

API_KEY_ENV = "INSTRUCTKIT_API_KEY"


@dataclass
class ServerLimits:
    """What one request may ask for and how much work may wait.

    Attributes:
        max_body_bytes: Largest request body; larger ones get 413.
        max_tokens: Largest ``max_tokens`` a request may ask for; more gets 400.
        default_max_tokens: ``max_tokens`` of a chat request that sets none (completions default to 16,
            as in the OpenAI API).
        max_queue: Requests waiting for the model; one more gets 503 with ``Retry-After``.
        max_batch: Sequences decoded together (a request with ``n`` choices counts ``n``).
        max_stop: Stop strings per request.
    """

    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_queue: int = 64
    max_batch: int = 8
    max_stop: int = 4


class APIError(Exception):
    """A request the server refuses; rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- request models


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; forbid: a misspelt argument is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted so clients that always send them work, but only at their neutral values.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = None


def _validation_error(e: ValidationError) -> APIError:
    errs = e.errors(include_url=False)
    first = errs[0]
    param = ".".join(str(x) for x in first["loc"]) or None
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    parts = []
    for err in errs[:5]:
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unrecognized request argument '{where}'")
        elif err["type"] == "model_type" and not where:
            parts.append("the request body must be a JSON object")
        else:
            parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    return APIError(400, "; ".join(parts) + more, param=param)


# ------------------------------------------------------------------------------------------- engine


@dataclass
class Job:
    """One request waiting for, or being decoded by, the worker."""

    prompt: list[int]
    n: int
    sampling: SamplingConfig
    stream: bool
    loop: asyncio.AbstractEventLoop
    include_usage: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def key(self) -> tuple:
        """Jobs with equal keys can share a batch (``max_new_tokens`` is enforced per sequence)."""
        s = self.sampling
        if s.seed is not None:
            return ("seeded", id(self))  # alone, so the seed alone decides the text
        if s.temperature == 0:
            return ("greedy", s.top_k, tuple(s.stop))
        return ("sampled", s.temperature, s.top_p, s.top_k, tuple(s.stop))

    def post(self, *event) -> None:
        # Called from the worker thread; asyncio queues may only be touched from their own loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is waiting
            pass


class QueueFull(Exception):
    pass


class Engine:
    """Owns the model: a queue of jobs and one worker thread that decodes them in batches."""

    def __init__(self, model, tokenizer, limits: ServerLimits | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or ServerLimits()
        add_end_of_turn_stops(model, tokenizer)
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.thread: threading.Thread | None = None
        self.stats = {"requests": 0, "batches": 0, "sequences": 0, "max_batch_sequences": 0, "errors": 0,
                      "cancelled": 0}
        self.busy = 0

    def start(self) -> Engine:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="instructkit-engine", daemon=True)
            self.thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.pending) >= self.limits.max_queue:
                raise QueueFull
            self.pending.append(job)
            self.stats["requests"] += 1
            self.cond.notify()

    def _take_batch(self) -> list[Job]:
        while self.pending and self.pending[0].cancelled:  # its client left while it waited
            self.pending.popleft()
            self.stats["cancelled"] += 1
        if not self.pending:
            return []
        first = self.pending.popleft()
        batch, rows, key = [first], first.n, first.key()
        for job in list(self.pending):
            if rows >= self.limits.max_batch:
                break
            if not job.cancelled and job.key() == key and rows + job.n <= self.limits.max_batch:
                self.pending.remove(job)
                batch.append(job)
                rows += job.n
        return batch

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                if self.closing:
                    return
                batch = self._take_batch()
                self.busy = sum(j.n for j in batch)
            if batch:
                self._run_batch(batch)
            self.busy = 0

    def _run_batch(self, batch: list[Job]) -> None:
        rows = [(job, c) for job in batch for c in range(job.n)]
        counts = [0] * len(rows)

        def on_token(i: int, tok: int) -> bool:
            job, c = rows[i]
            counts[i] += 1
            if job.stream:
                job.post("token", c, tok)
            return job.cancelled or counts[i] >= job.sampling.max_new_tokens

        sampling = replace(batch[0].sampling, max_new_tokens=max(j.sampling.max_new_tokens for j in batch))
        self.stats["batches"] += 1
        self.stats["sequences"] += len(rows)
        self.stats["max_batch_sequences"] = max(self.stats["max_batch_sequences"], len(rows))
        try:
            gens = generate(self.model, self.tokenizer, [job.prompt for job, _ in rows], sampling,
                            batch_size=len(rows), on_token=on_token)
        except Exception as e:  # noqa: BLE001 - a failed batch must not kill the worker
            self.stats["errors"] += 1
            for job in batch:
                job.post("error", f"generation failed: {type(e).__name__}: {e}")
            return
        k = 0
        for job in batch:
            self.stats["cancelled"] += job.cancelled
            job.post("done", gens[k:k + job.n])
            k += job.n


# ---------------------------------------------------------------------------------------------- app


class _Guard:
    """ASGI middleware run before routing: the API key for ``/v1/*`` and the request body size.

    Authentication comes first, so an unauthenticated client learns nothing about request
    validation. The body is read here, up to the limit, whether or not it declares its length
    (chunked uploads do not), then replayed to the application.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def _refuse(self, scope, receive, send, e: APIError) -> None:
        await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given:
                return await self._refuse(scope, receive, send, APIError(
                    401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"))
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await self._refuse(scope, receive, send, APIError(
                    401, "incorrect API key provided", code="invalid_api_key"))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body larger than {self.max_body} bytes", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._refuse(scope, receive, send, too_big)
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body.extend(msg.get("body", b""))
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await self._refuse(scope, receive, send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later messages (a disconnect) come from the client as usual

        return await self.app(scope, replay, send)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(engine: Engine, model_id: str, api_key: str | None = None):
    """The FastAPI application around a (started) :class:`Engine`."""
    limits = engine.limits
    # The request side gets its own tokenizer: a Rust tokenizer shared across threads can fail with
    # "Already borrowed" while the worker decodes.
    tok = copy.deepcopy(engine.tokenizer)
    template = tok.chat_template
    if isinstance(template, dict):  # some tokenizers carry several named templates
        template = template.get("default")
    max_context = getattr(engine.model.config, "max_position_embeddings", None)
    created = int(time.time())
    app = FastAPI(title="instructkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(APIError(e.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _crash(request, e):
        return error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"the model '{name}' does not exist on this server; it serves '{model_id}'",
                           param="model", code="model_not_found")

    def sampling_for(req: _Sampling, max_tokens: int | None, default: int, n_prompt: int,
                     prompt_field: str) -> SamplingConfig:
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported (use 0)",
                           param="presence_penalty" if req.presence_penalty else "frequency_penalty")
        if req.n > limits.max_batch:
            raise APIError(400, f"n is {req.n}; this server allows at most {limits.max_batch}", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > limits.max_stop:
            raise APIError(400, f"at most {limits.max_stop} stop strings are allowed, got {len(stop)}", param="stop")
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of {limits.max_tokens} "
                                "(the server's --max-tokens-limit option raises it)", param="max_tokens")
        wanted = max_tokens if max_tokens is not None else min(default, limits.max_tokens)
        if max_context is not None:
            room = max_context - n_prompt
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise APIError(400, f"the prompt is {n_prompt} tokens; with max_tokens {wanted} it exceeds the "
                                    f"model's context of {max_context} tokens", param=prompt_field,
                               code="context_length_exceeded")
            wanted = min(wanted, room)
        return SamplingConfig(max_new_tokens=wanted, temperature=req.temperature,
                              top_p=req.top_p if req.temperature > 0 else 1.0, stop=stop, seed=req.seed)

    async def run_job(prompt: list[int], req: _Sampling, sampling: SamplingConfig) -> Job:
        job = Job(prompt, req.n, sampling, req.stream, asyncio.get_running_loop(),
                  include_usage=bool(req.stream_options and req.stream_options.include_usage))
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(503, f"the server is busy ({limits.max_queue} requests waiting); retry shortly",
                           type="server_error", code="server_overloaded", headers={"Retry-After": "1"}) from None
        return job

    async def wait_done(job: Job) -> list[Generation]:
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "done":
                    return ev[1]
                if ev[0] == "error":
                    raise APIError(500, ev[1], type="server_error")
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def usage(n_prompt: int, gens: list[Generation]) -> dict:
        n_out = sum(len(g.token_ids) for g in gens)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def stream(job: Job, n_prompt: int, head: dict, delta_of, first_delta: dict | None):
        """SSE events: a chunk per text delta per choice, a finish chunk per choice, optional usage, [DONE]."""
        def chunk(i: int, delta: dict | str, finish: str | None) -> str:
            return _sse({**head, "choices": [{"index": i, **delta_of(delta), "logprobs": None,
                                              "finish_reason": finish}]})

        async def events():
            decoders = [StreamDecoder(tok, job.sampling.stop) for _ in range(job.n)]
            try:
                if first_delta is not None:
                    for i in range(job.n):
                        yield chunk(i, first_delta, None)
                while True:
                    ev = await job.events.get()
                    if ev[0] == "token":
                        text = decoders[ev[1]].push(ev[2])
                        if text:
                            yield chunk(ev[1], text, None)
                    elif ev[0] == "error":
                        yield _sse(APIError(500, ev[1], type="server_error").body())
                        return
                    else:
                        gens = ev[1]
                        for i, g in enumerate(gens):
                            rest = decoders[i].finish()
                            if rest:
                                yield chunk(i, rest, None)
                            yield chunk(i, "", g.finish_reason)
                        if job.include_usage:
                            yield _sse({**head, "choices": [], "usage": usage(n_prompt, gens)})
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled = True  # the client left (or we are done): stop decoding for it

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def parse(request: Request, cls):
        try:
            return cls.model_validate_json(await request.body())
        except ValidationError as e:
            raise _validation_error(e) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        check_model(req.model)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        from instructkit.data.encode import encode_prompt
        from instructkit.data.errors import DataError

        if not template:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions, or restart the "
                                "server with --template NAME (chatml, llama3, zephyr, alpaca, plain)",
                           param="messages", code="no_chat_template")
        try:
            prompt = encode_prompt(tok, messages, template=template)
        except DataError as e:
            raise APIError(400, f"the model's chat template cannot render these messages: {e}",
                           param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sampling = sampling_for(req, max_tokens, limits.default_max_tokens, len(prompt), "messages")
        job = await run_job(prompt, req, sampling)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "system_fingerprint": None}
            return stream(job, len(prompt), head,
                          lambda d: {"delta": d if isinstance(d, dict) else ({"content": d} if d else {})},
                          {"role": "assistant", "content": ""})
        gens = await wait_done(job)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": i, "message": {"role": "assistant", "content": g.text},
                             "logprobs": None, "finish_reason": g.finish_reason} for i, g in enumerate(gens)],
                "usage": usage(len(prompt), gens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        check_model(req.model)
        if req.echo or req.logprobs:
            raise APIError(400, "echo and logprobs are not supported by this server",
                           param="echo" if req.echo else "logprobs")
        prompt = tok(req.prompt, add_special_tokens=True)["input_ids"]
        if not prompt:
            raise APIError(400, "prompt is empty; give at least one character", param="prompt")
        sampling = sampling_for(req, req.max_tokens, 16, len(prompt), "prompt")
        job = await run_job(prompt, req, sampling)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            head = {"id": rid, "object": "text_completion", "created": now, "model": model_id}
            return stream(job, len(prompt), head, lambda d: {"text": d}, None)
        gens = await wait_done(job)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                "choices": [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                            for i, g in enumerate(gens)],
                "usage": usage(len(prompt), gens)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "instructkit"}]}

    @app.get("/health")
    async def health():
        alive = engine.thread is not None and engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "starting", "model": model_id,
                             "queued": len(engine.pending), "decoding": engine.busy, **engine.stats},
                            status_code=200 if alive else 503)

    return app


def resolve_api_key(cli_key: str | None) -> str | None:
    """``--api-key`` wins; otherwise the ``INSTRUCTKIT_API_KEY`` environment variable; empty means none."""
    return cli_key or os.environ.get(API_KEY_ENV) or None


def serve(model_dir: str, adapter: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, limits: ServerLimits | None = None,
          template: str | None = None) -> None:
    """Load the model and serve it until interrupted."""
    import sys
    from pathlib import Path

    import uvicorn

    from instructkit.models import load_for_inference

    model, tokenizer = load_for_inference(model_dir, adapter, template)
    if not tokenizer.chat_template:
        print("warning: the tokenizer has no chat template; /v1/chat/completions will fail (use "
              "--template NAME, or /v1/completions)", file=sys.stderr)
    model_id = model_name or Path(adapter or model_dir).resolve().name
    engine = Engine(model, tokenizer, limits).start()
    app = build_app(engine, model_id, api_key)
    print(f"serving '{model_id}' on http://{host}:{port}/v1 (API key {'required' if api_key else 'off'}; "
          f"batch {engine.limits.max_batch}, queue {engine.limits.max_queue}, max_tokens "
          f"{engine.limits.max_tokens})", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without an API key: anyone who can reach this port can "
              f"use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
