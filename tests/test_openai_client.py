"""OpenAI-compatible client against a local fake server: retries, backoff, errors, concurrency, secrecy."""

import logging
import threading
import time

import pytest
from fake_openai_server import FakeOpenAI, Reply

from instructkit.openai_client import (AuthenticationError, BadRequestError, ConnectionFailedError,
                                       EndpointUnavailableError, NotFoundError, OpenAIClient,
                                       ResponseFormatError, _retry_after_seconds)

SECRET = "sk-test-SECRET-0123456789abcdef"
MSGS = [{"role": "user", "content": "hi"}]


class Sleeps(list):
    """Records the waits the client asks for instead of sleeping."""

    def __call__(self, seconds):
        self.append(seconds)


def client(url, **kw):
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("backoff_base", 0.5)
    kw.setdefault("timeout", 5.0)
    return OpenAIClient(url, "fake", **kw)


def test_chat_sends_model_messages_sampling_and_bearer_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    with FakeOpenAI(lambda call: "hello there") as srv:
        c = client(srv.url, api_key_env="MY_KEY", default_sampling={"temperature": 0})
        assert c.chat(MSGS, max_tokens=7) == "hello there"
        body, headers = srv.calls[0].body, srv.calls[0].headers
        assert srv.calls[0].path == "/v1/chat/completions"
        assert body == {"model": "fake", "messages": MSGS, "temperature": 0, "max_tokens": 7}
        assert headers["authorization"] == f"Bearer {SECRET}"
        assert c.stats.succeeded == 1 and c.stats.prompt_tokens == 3 and c.stats.completion_tokens == 2


def test_no_key_sends_no_authorization_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAI(lambda call: "ok") as srv:
        assert client(srv.url).chat(MSGS) == "ok"
        assert "authorization" not in srv.calls[0].headers


def test_429_then_200_honours_retry_after():
    def respond(call):
        if call.index == 0:
            return Reply(429, {"error": {"message": "rate limited"}}, headers={"Retry-After": "3"})
        if call.index == 1:
            return Reply(429, {"error": {"message": "rate limited"}}, headers={"retry-after-ms": "250"})
        return "finally"

    with FakeOpenAI(respond) as srv:
        c = client(srv.url)
        assert c.chat(MSGS) == "finally"
        assert c._sleep == [3.0, 0.25]  # server-given waits, not the exponential schedule
        assert len(srv.calls) == 3 and c.stats.retries == 2 and c.stats.attempts == 3


def test_5xx_retries_with_exponential_backoff_and_jitter_then_gives_up():
    with FakeOpenAI(lambda call: Reply(503, {"error": {"message": "overloaded"}})) as srv:
        c = client(srv.url, max_retries=4, backoff_base=0.5, backoff_max=3.0)
        with pytest.raises(EndpointUnavailableError) as e:
            c.chat(MSGS)
        assert len(srv.calls) == 5
        # attempt k waits in [cap/2, cap] with cap = min(3, 0.5 * 2**k)
        caps = [0.5, 1.0, 2.0, 3.0]
        assert len(c._sleep) == 4
        assert all(cap / 2 <= s <= cap for s, cap in zip(c._sleep, caps)), c._sleep
        assert "after 5 attempt(s)" in str(e.value) and "HTTP 503: overloaded" in str(e.value)
        assert c.stats.failed == 1


def test_500_then_success():
    with FakeOpenAI(lambda call: Reply(500, "oops") if call.index < 2 else "ok") as srv:
        c = client(srv.url)
        assert c.chat(MSGS) == "ok" and len(srv.calls) == 3


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_is_not_retried_and_names_the_variable(monkeypatch, status):
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    with FakeOpenAI(lambda call: Reply(status, {"error": {"message": "invalid api key"}})) as srv:
        c = client(srv.url, api_key_env="JUDGE_KEY")
        with pytest.raises(AuthenticationError) as e:
            c.chat(MSGS)
        assert len(srv.calls) == 1  # no retry
        msg = str(e.value)
        assert "JUDGE_KEY is not set" in msg and f"HTTP {status}" in msg and "export JUDGE_KEY=" in msg
        monkeypatch.setenv("JUDGE_KEY", SECRET)
        with pytest.raises(AuthenticationError, match="key in the environment variable JUDGE_KEY was rejected"):
            client(srv.url, api_key_env="JUDGE_KEY").chat(MSGS)


def test_404_model_not_found_lists_served_models():
    reply = Reply(404, {"error": {"message": "The model `fake` does not exist.", "code": "model_not_found"}})
    with FakeOpenAI(lambda call: reply, models=("judge-7b", "judge-70b")) as srv:
        c = client(srv.url)
        with pytest.raises(NotFoundError) as e:
            c.chat(MSGS)
        assert len(srv.calls) == 1
        msg = str(e.value)
        assert "model 'fake' does not exist" in msg and "judge-7b, judge-70b" in msg and "/v1" in msg


def test_other_4xx_is_a_bad_request_without_retry():
    with FakeOpenAI(lambda call: Reply(400, {"error": {"message": "max_tokens too large"}})) as srv:
        with pytest.raises(BadRequestError, match="HTTP 400: max_tokens too large"):
            client(srv.url).chat(MSGS)
        assert len(srv.calls) == 1


def test_malformed_success_body_is_a_format_error():
    with FakeOpenAI(lambda call: Reply(200, {"choices": []})) as srv:
        with pytest.raises(ResponseFormatError, match="choices"):
            client(srv.url).chat(MSGS)
    with FakeOpenAI(lambda call: Reply(200, "<html>proxy error</html>")) as srv:
        with pytest.raises(ResponseFormatError, match="not JSON"):
            client(srv.url).chat(MSGS)


def test_slow_response_times_out_and_is_retried():
    with FakeOpenAI(lambda call: Reply(body={}, delay=1.5) if call.index == 0 else "fast") as srv:
        c = client(srv.url, timeout=0.3)
        t0 = time.perf_counter()
        assert c.chat(MSGS) == "fast"
        assert time.perf_counter() - t0 < 1.4 and c.stats.retries == 1
    with FakeOpenAI(lambda call: Reply(body={}, delay=1.5)) as srv:
        c = client(srv.url, timeout=0.2, max_retries=1)
        with pytest.raises(EndpointUnavailableError, match=r"timed out .*after 0.2s"):
            c.chat(MSGS)
        assert len(srv.calls) == 2


def test_connection_refused_is_retried_then_reported():
    with FakeOpenAI(lambda call: "unused") as srv:
        url = srv.url
    c = client(url, max_retries=2)  # the server is gone: nothing listens on the port
    with pytest.raises(EndpointUnavailableError, match="connection failed"):
        c.chat(MSGS)
    assert c.stats.attempts == 3


def test_chat_many_stops_when_the_server_cannot_be_reached():
    with FakeOpenAI(lambda call: "unused") as srv:
        url = srv.url
    c = client(url, max_retries=1, concurrency=2)
    with pytest.raises(ConnectionFailedError, match="base URL"):
        c.chat_many([MSGS] * 20, return_exceptions=True)
    assert c.stats.attempts <= 4  # the two requests in flight, not all twenty


def test_chat_many_respects_the_concurrency_limit_and_keeps_order():
    with FakeOpenAI(_echo_slow) as srv:
        c = client(srv.url, concurrency=3)
        convs = [[{"role": "user", "content": f"q{i}"}] for i in range(18)]
        seen = []
        out = c.chat_many(convs, on_result=lambda i, r: seen.append(i))
        assert out == [f"answer to q{i}" for i in range(18)]
        assert sorted(seen) == list(range(18))
        assert srv.max_in_flight == 3  # never more than the limit, and the limit was reached
        srv.max_in_flight = 0
        c.chat_many(convs[:10], concurrency=5)
        assert srv.max_in_flight == 5


def _echo_slow(call):
    time.sleep(0.05)
    return "answer to " + call.body["messages"][0]["content"]


def test_chat_many_returns_errors_in_place_or_raises():
    def respond(call):
        return Reply(400, {"error": {"message": "too long"}}) if "bad" in call.user_text else "ok"

    with FakeOpenAI(respond) as srv:
        c = client(srv.url, concurrency=2)
        convs = [[{"role": "user", "content": t}] for t in ("a", "bad", "c")]
        out = c.chat_many(convs, return_exceptions=True)
        assert out[0] == "ok" and out[2] == "ok" and isinstance(out[1], BadRequestError)
        with pytest.raises(BadRequestError):
            c.chat_many(convs)


def test_chat_many_stops_on_authentication_failure_even_when_returning_exceptions():
    with FakeOpenAI(lambda call: Reply(401, {"error": {"message": "no"}})) as srv:
        c = client(srv.url, concurrency=2)
        convs = [[{"role": "user", "content": str(i)}] for i in range(50)]
        with pytest.raises(AuthenticationError):
            c.chat_many(convs, return_exceptions=True)
        assert len(srv.calls) <= 2  # only those already in flight; the rest were cancelled


def test_completions_endpoint():
    def respond(call):
        return Reply(body={"choices": [{"text": " world", "index": 0}]})

    with FakeOpenAI(respond) as srv:
        assert client(srv.url).complete("hello", max_tokens=3) == " world"
        assert srv.calls[0].path == "/v1/completions" and srv.calls[0].body["prompt"] == "hello"


def test_api_key_never_appears_in_logs_errors_or_repr(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def respond(call):
        # A careless server that echoes the credentials it received in every error body.
        echoed = f"bad request from {call.headers.get('authorization')}"
        if call.index == 0:
            return Reply(500, {"error": {"message": echoed}})
        if call.index == 1:
            return Reply(401, {"error": {"message": echoed}})
        return Reply(422, {"error": {"message": echoed}})

    caplog.set_level(logging.DEBUG)  # includes httpx/httpcore debug logging
    with FakeOpenAI(respond) as srv:
        c = client(srv.url)
        errors = []
        for _ in range(2):
            try:
                c.chat(MSGS)
            except Exception as e:  # noqa: BLE001 - collecting every message
                errors.append(e)
        assert isinstance(errors[0], AuthenticationError) and isinstance(errors[1], BadRequestError)
        texts = [str(e) for e in errors] + [repr(e) for e in errors] + [repr(c), str(c.describe()),
                                                                       caplog.text]
        assert "***" in str(errors[0])  # the echoed key was redacted, not just absent
        for t in texts:
            assert SECRET not in t
        assert "api_key_env='OPENAI_API_KEY' (set)" in repr(c)
    assert srv.calls[0].headers["authorization"] == f"Bearer {SECRET}"  # it was really sent


def test_retry_after_parsing():
    import email.utils

    import httpx

    assert _retry_after_seconds(httpx.Headers({"retry-after": "2.5"})) == 2.5
    assert _retry_after_seconds(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after_seconds(httpx.Headers({"retry-after": future})) <= 31
    assert _retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert _retry_after_seconds(httpx.Headers({})) is None


def test_retry_after_is_capped_by_backoff_max():
    with FakeOpenAI(lambda call: Reply(429, {}, headers={"Retry-After": "3600"}) if call.index == 0
                    else "ok") as srv:
        c = client(srv.url, backoff_max=2.0)
        assert c.chat(MSGS) == "ok" and c._sleep == [2.0]


def test_client_is_safe_to_share_between_threads():
    with FakeOpenAI(lambda call: "x") as srv:
        c = client(srv.url)
        threads = [threading.Thread(target=lambda: [c.chat(MSGS) for _ in range(5)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert c.stats.succeeded == 20 and len(srv.calls) == 20
