"""The OpenAI-compatible server, driven as a user would: the official `openai` client over loopback HTTP."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import uvicorn

from instructkit.data.encode import encode_prompt
from instructkit.generate import SamplingConfig, add_end_of_turn_stops, generate
from instructkit.models import load_for_inference
from instructkit.serve import Engine, ServerLimits, build_app

KEY = "test-key-3f9a"
LIMITS = dict(max_body_bytes=16_384, max_tokens=64, max_queue=64, max_batch=8)


class Server:
    """uvicorn in a background thread on a socket we bound ourselves (no port race)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_for_inference(tiny_model_dir)


@pytest.fixture(scope="module")
def served(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, ServerLimits(**LIMITS)).start()
    srv = Server(build_app(engine, "nano", api_key=KEY))
    yield srv, engine
    srv.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(loaded, messages, **sampling):
    """What generate() gives for the same conversation: the server must add nothing and lose nothing."""
    model, tok = loaded
    ids = encode_prompt(tok, messages, template=tok.chat_template)
    return ids, generate(model, tok, [ids], SamplingConfig(**sampling))[0]


def post(url, body: bytes, headers=None, method="POST"):
    req = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 3, 1, 2 please"}]


def test_chat_and_completions_match_generate(client, loaded):
    ids, ref = reference(loaded, MSGS, max_new_tokens=12, temperature=0)
    r = client.chat.completions.create(model="nano", messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "nano" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    assert r.usage.total_tokens == len(ids) + len(ref.token_ids)

    model, tok = loaded
    pids = tok("The list of numbers", add_special_tokens=True)["input_ids"]
    cref = generate(model, tok, [pids], SamplingConfig(max_new_tokens=7, temperature=0))[0]
    c = client.completions.create(model="nano", prompt="The list of numbers", max_tokens=7, temperature=0)
    assert c.object == "text_completion" and c.choices[0].text == cref.text
    assert c.usage.prompt_tokens == len(pids) and c.usage.completion_tokens == len(cref.token_ids) == 7
    assert c.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["nano"]


def test_streaming_sends_tokens_as_they_come(client, loaded):
    _, ref = reference(loaded, MSGS, max_new_tokens=16, temperature=1.0, seed=11)
    chunks = list(client.chat.completions.create(model="nano", messages=MSGS, max_tokens=16, temperature=1.0,
                                                 seed=11, stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == ref.text
    assert len(content) > 3  # token by token, not one blob at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)

    # A stop string cuts the stream exactly where the non-streaming answer is cut, and never shows up.
    stop = ref.text[6:9]
    assert len(stop) == 3
    cut = ref.text[:ref.text.find(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="nano", messages=MSGS, max_tokens=16, temperature=1.0, seed=11, stop=stop, stream=True))
    plain = client.chat.completions.create(model="nano", messages=MSGS, max_tokens=16, temperature=1.0, seed=11,
                                           stop=[stop])
    assert streamed == plain.choices[0].message.content == cut
    assert plain.choices[0].finish_reason == "stop"


def test_raw_sse_framing_and_completion_stream(served):
    srv, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    body = json.dumps({"model": "nano", "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                    "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    parsed = [json.loads(e[6:]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"


def test_seed_repeats_and_n_gives_several_choices(client):
    def ask(seed, n=1):
        r = client.chat.completions.create(model="nano", messages=MSGS, max_tokens=12, temperature=1.0,
                                           top_p=0.95, seed=seed, n=n)
        return [c.message.content for c in r.choices]

    a, b, c = ask(5), ask(5), ask(6)
    assert a == b and a != c
    many = ask(5, n=3)
    assert len(many) == 3 and len(set(many)) > 1  # three independent samples
    assert ask(5, n=3) == many


def test_fifty_concurrent_requests_all_answered_and_batched(client, served, loaded):
    _, engine = served
    batches_before = engine.stats["batches"]
    refs = {k: reference(loaded, [{"role": "user", "content": f"Count to {k}"}], max_new_tokens=4 + k % 5,
                         temperature=0)[1].text for k in range(10)}

    def one(i):
        k = i % 10
        msgs = [{"role": "user", "content": f"Count to {k}"}]
        if i % 3 == 0:  # streamed
            chunks = list(client.chat.completions.create(model="nano", messages=msgs, max_tokens=4 + k % 5,
                                                         temperature=0, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            return k, text, None
        if i % 3 == 1:  # sampled: only the shape can be checked
            r = client.chat.completions.create(model="nano", messages=msgs, max_tokens=8, temperature=0.8)
            assert r.usage.completion_tokens <= 8
            return k, None, r
        r = client.chat.completions.create(model="nano", messages=msgs, max_tokens=4 + k % 5, temperature=0)
        assert r.usage.completion_tokens <= 4 + k % 5
        return k, r.choices[0].message.content, r

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(50)))
    assert len(results) == 50
    for k, text, r in results:
        if r is not None:
            assert r.object == "chat.completion" and len(r.choices) == 1
            assert r.choices[0].finish_reason in ("stop", "length")
            assert isinstance(r.choices[0].message.content, str)
        if text is not None:  # greedy: batching with other requests must not change a single token
            assert text == refs[k]
    # Requests really were decoded together: fewer batches than requests.
    assert engine.stats["max_batch_sequences"] > 1
    assert engine.stats["batches"] - batches_before < 50


BAD = [
    # (what, body, expected status, expected param or code substring)
    ("wrong type: temperature", {"messages": MSGS, "temperature": "hot"}, 400, "temperature"),
    ("wrong type: max_tokens as string", {"messages": MSGS, "max_tokens": "5"}, 400, "max_tokens"),
    ("wrong type: messages", {"messages": "hello"}, 400, "messages"),
    ("wrong type: n float", {"messages": MSGS, "n": 1.5}, 400, "n"),
    ("negative max_tokens", {"messages": MSGS, "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens above limit", {"messages": MSGS, "max_tokens": 10_000}, 400, "max_tokens"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("missing messages", {"model": "nano"}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("unknown argument", {"messages": MSGS, "temprature": 0.5}, 400, "temprature"),
    ("temperature out of range", {"messages": MSGS, "temperature": 9}, 400, "temperature"),
    ("top_p zero", {"messages": MSGS, "top_p": 0}, 400, "top_p"),
    ("n above batch", {"messages": MSGS, "n": 99}, 400, "n"),
    ("too many stops", {"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("unsupported penalty", {"messages": MSGS, "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("wrong model", {"messages": MSGS, "model": "gpt-9"}, 404, "model_not_found"),
    ("body is a list", [1, 2], 400, None),
    ("prompt beyond the context", {"messages": [{"role": "user", "content": "word " * 3000}]}, 400,
     "context_length_exceeded"),
]


@pytest.mark.parametrize("what,body,status,where", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_4xx_json(served, what, body, status, where):
    code, _, payload = post(served[0].url + "/v1/chat/completions", json.dumps(body).encode())
    assert code == status, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if where:
        assert where in (err["param"] or "") or where == err["code"], err


def test_malformed_transport_and_server_stays_up(served, client):
    srv, _ = served
    url = srv.url
    code, _, p = post(url + "/v1/chat/completions", b'{"messages": [')
    assert code == 400 and p["error"]["code"] == "invalid_json"
    code, _, p = post(url + "/v1/chat/completions", json.dumps({"messages": MSGS, "pad": "x" * 20_000}).encode())
    assert code == 413 and p["error"]["code"] == "request_too_large"
    # A chunked upload declares no length; it is still cut off at the limit.
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=iter([b'{"messages": "', b"y" * 10_000, b"z" * 10_000]),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                 encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    code, _, p = post(url + "/v1/completions", json.dumps({"prompt": ""}).encode())
    assert code == 400 and p["error"]["param"] == "prompt"
    code, _, p = post(url + "/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode())
    assert code == 400 and p["error"]["param"].startswith("prompt")
    code, _, p = post(url + "/v1/nothing", b"{}")
    assert code == 404 and "error" in p
    code, _, p = post(url + "/v1/chat/completions", b"", method="GET")
    assert code == 405 and "error" in p
    with urllib.request.urlopen(url + "/health") as h:
        health = json.loads(h.read())
    assert health["status"] == "ok" and health["errors"] == 0
    assert client.chat.completions.create(model="nano", messages=MSGS, max_tokens=2).choices[0].message is not None


def test_api_key_required_on_v1(served):
    srv, _ = served
    body = json.dumps({"messages": MSGS, "max_tokens": 2}).encode()
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        code, _, p = post(srv.url + "/v1/chat/completions", body, headers)
        assert code == 401 and p["error"]["code"] == "invalid_api_key"
        assert KEY not in json.dumps(p)
    code, _, _ = post(srv.url + "/v1/models", b"", {"Authorization": "Bearer nope"}, method="GET")
    assert code == 401
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with urllib.request.urlopen(srv.url + "/health") as h:  # health checks need no key
        assert h.status == 200


def test_full_queue_gets_503_then_drains(loaded):
    model, tok = loaded
    engine = Engine(model, tok, ServerLimits(max_queue=1))  # worker not started yet: requests wait
    srv = Server(build_app(engine, "nano"))
    try:
        with urllib.request.urlopen(srv.url + "/health") as h:
            pytest.fail(f"health should be 503 before the worker runs, got {h.status}")
    except urllib.error.HTTPError as e:
        assert e.code == 503
    body = json.dumps({"messages": MSGS, "max_tokens": 3}).encode()
    first = {}
    t = threading.Thread(target=lambda: first.update(r=post(srv.url + "/v1/chat/completions", body)))
    t.start()
    deadline = time.time() + 10
    while not engine.pending:
        assert time.time() < deadline
        time.sleep(0.01)
    code, headers, p = post(srv.url + "/v1/chat/completions", body)
    assert code == 503 and p["error"]["code"] == "server_overloaded" and headers.get("retry-after") == "1"
    engine.start()
    t.join(timeout=30)
    assert first["r"][0] == 200 and first["r"][2]["choices"][0]["finish_reason"] in ("stop", "length")
    srv.stop()
    engine.close()


def test_cli_serve_end_to_end_with_env_key(tiny_model_dir, tmp_path):
    """`python -m instructkit serve` as a user runs it: key from the environment, never printed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "sk-env-only-7781"
    env = {**os.environ, "INSTRUCTKIT_API_KEY": secret, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "instructkit", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--max-tokens-limit", "32"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as h:
                    if h.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.25)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = json.dumps({"model": Path(tiny_model_dir).name, "messages": MSGS, "max_tokens": 4}).encode()
        code, _, _ = post(url, body, {"Authorization": ""})
        assert code == 401
        code, _, p = post(url, body, {"Authorization": f"Bearer {secret}"})
        assert code == 200 and p["choices"][0]["message"]["role"] == "assistant"
        code, _, p = post(url, json.dumps({"messages": MSGS, "max_tokens": 33}).encode(),
                          {"Authorization": f"Bearer {secret}"})
        assert code == 400 and "limit of 32" in p["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    out = (tmp_path / "serve.log").read_text()
    assert f"serving '{Path(tiny_model_dir).name}' on http://127.0.0.1:{port}/v1 (API key required" in out
    assert secret not in out


def test_serve_imports_no_training_code():
    import ast

    src = (Path(__file__).parents[1] / "instructkit" / "serve.py").read_text()
    mods = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in mods if m.startswith(("instructkit.loop", "instructkit.losses", "instructkit.methods"))]


def test_disconnected_stream_stops_decoding(loaded):
    """A client that goes away mid-stream frees the worker instead of decoding to max_tokens."""
    model, tok = loaded
    engine = Engine(model, tok, ServerLimits(max_tokens=200)).start()
    srv = Server(build_app(engine, "nano"))
    specials = sorted(set(tok.all_special_ids) | add_end_of_turn_stops(model, tok))

    def slow_and_endless(module, args, logits):
        # 20 ms a token, and no token that could end the reply: a sampled end-of-turn would finish
        # the request on its own before the disconnect is seen.
        time.sleep(0.02)
        logits = logits.clone()
        logits[..., specials] = float("-inf")
        return logits

    hook = model.get_output_embeddings().register_forward_hook(slow_and_endless)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        body = json.dumps({"messages": MSGS, "max_tokens": 200, "stream": True, "temperature": 1.0})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        # The first event (the assistant role) is sent before the worker takes the job; wait for a token,
        # so the disconnect lands while decoding (a CI flake when the worker was slow to start).
        while True:
            line = resp.readline()
            assert line, "the stream ended before any token"
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        assert engine.busy
        t0 = time.time()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        while engine.busy:  # 200 tokens x 20 ms would take 4 s
            assert time.time() - t0 < 2.0, "the worker kept decoding for a client that left"
            time.sleep(0.02)
        assert engine.stats["cancelled"] == 1
    finally:
        hook.remove()
        srv.stop()
        engine.close()


def test_model_without_chat_template_gets_a_clear_400(loaded):
    import copy

    model, tok = loaded
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    engine = Engine(model, bare)  # never started: the request is refused before it is queued
    srv = Server(build_app(engine, "nano"))
    try:
        code, _, p = post(srv.url + "/v1/chat/completions", json.dumps({"messages": MSGS}).encode())
        assert code == 400 and p["error"]["code"] == "no_chat_template" and "--template" in p["error"]["message"]
        assert not engine.pending
    finally:
        srv.stop()
