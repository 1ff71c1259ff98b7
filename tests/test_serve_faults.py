"""A server a team can put on a network: the API key (the official client with and without it), the Host
allow-list, JSON bodies only, CORS by flag, /metrics read by a Prometheus parser, logprobs and
/tokenize through the client, and faults: a client gone mid-stream, a slow reader, a burst past the
queue, an injected worker crash, the attack inputs; the server answers every one and serves after."""
import http.client
import json
import socket
import asyncio
import threading

import pytest

from conftest import LiveServer, wait_until
from loadtest import run_clients, stream_completion

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PLAIN = {"temperature": 1.0, "guidance": 1.0, "candidates": 1}


def call(server, method, path, body=None, headers=None, raw=None):
    """(status, headers, body bytes) of one request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    payload = raw if raw is not None else (None if body is None else json.dumps(body))
    connection.request(method, path, payload, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.msg, data


@pytest.fixture(scope="module")
def keyed_server(serve_ckpt):
    pytest.importorskip("prometheus_client", reason="the server needs the serve extra: pip install -e '.[serve]'")
    server = LiveServer(serve_ckpt, "--api_key", KEY, "--cors_origins", "http://page.example")
    yield server
    server.stop()


def test_the_openai_client_needs_the_key(keyed_server):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEY, max_retries=0)
    done = client.completions.create(model="any", prompt="好看", max_tokens=8, logprobs=2, seed=1,
                                     extra_body={"sentiment": "pos", **PLAIN})
    logprobs = done.choices[0].logprobs
    assert "".join(logprobs.tokens) == done.choices[0].text and len(logprobs.tokens) == len(logprobs.token_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    streamed = [c for c in client.completions.create(model="any", prompt="好看", max_tokens=8, logprobs=1, seed=1,
                                                     stream=True, extra_body={"sentiment": "pos", **PLAIN})]
    tokens = [t for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert tokens == logprobs.tokens  # the same seed, streamed: the same tokens and log-probabilities


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/v1/model_card"), ("GET", "/metrics"),
                                          ("POST", "/v1/completions"), ("POST", "/tokenize")])
def test_every_route_but_health_and_the_page_needs_the_key(keyed_server, method, path):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        status, answer, body = call(keyed_server, method, path, {"prompt": "好"} if method == "POST" else None, headers)
        assert status == 401 and answer["WWW-Authenticate"] == "Bearer"
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert call(keyed_server, "GET", "/health")[0] == 200
    assert call(keyed_server, "GET", "/")[0] == 200


def test_tokenize_and_detokenize(keyed_server):
    status, _, body = call(keyed_server, "POST", "/tokenize", {"content": "好看"}, AUTH)
    tokens = json.loads(body)["tokens"]
    assert status == 200 and len(tokens) == 2
    assert json.loads(call(keyed_server, "POST", "/detokenize", {"tokens": tokens}, AUTH)[2]) == {"content": "好看"}
    status, _, body = call(keyed_server, "POST", "/tokenize", {"content": "好@"}, AUTH)
    assert status == 400 and json.loads(body)["error"]["param"] == "content"
    status, _, body = call(keyed_server, "POST", "/detokenize", {"tokens": [10 ** 9]}, AUTH)
    assert status == 400 and json.loads(body)["error"]["param"] == "tokens"


def test_cors_answers_the_named_origin_only(keyed_server, live_server):
    preflight = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = call(keyed_server, "OPTIONS", "/v1/completions", headers=preflight)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://page.example"
    status, headers, _ = call(keyed_server, "OPTIONS", "/v1/completions",
                              headers={**preflight, "Origin": "http://evil.example"})
    assert headers["Access-Control-Allow-Origin"] is None
    _, headers, _ = call(live_server, "GET", "/v1/models", headers={"Origin": "http://page.example"})
    assert headers["Access-Control-Allow-Origin"] is None  # no origins by default


def test_metrics_in_the_prometheus_format_after_traffic(keyed_server):
    from prometheus_client.parser import text_string_to_metric_families
    body = {"prompt": "好看", "max_tokens": 6, "n": 2, "sentiment": "neg", **PLAIN}
    assert call(keyed_server, "POST", "/v1/completions", body, AUTH)[0] == 200
    assert call(keyed_server, "POST", "/v1/completions", {"prompt": "好", "n": 0}, AUTH)[0] == 400
    status, headers, text = call(keyed_server, "GET", "/metrics", headers=AUTH)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert samples[("mingpt_requests_total", (("route", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("mingpt_errors_total", (("kind", "bad_request"),))] >= 1
    assert samples[("mingpt_completion_tokens_total", ())] >= 2
    assert samples[("mingpt_prompt_tokens_total", ())] >= 8
    assert samples[("mingpt_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("mingpt_inter_token_latency_seconds_count", ())] >= 1
    assert samples[("mingpt_engine_up", ())] == 1 and ("mingpt_queue_depth", ()) in samples
    assert ("mingpt_batch_rows", ()) in samples and samples[("mingpt_decode_step_seconds_count", ())] >= 1


def test_loopback_answers_loopback_host_names_only(live_server):
    for host in ("localhost", f"localhost:{live_server.port}", "127.0.0.1:1", "[::1]:80"):
        assert call(live_server, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
    status, _, body = call(live_server, "GET", "/v1/models", headers={"Host": "rebound.example"})
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_host"


def test_a_body_that_is_not_json_is_a_415(live_server):
    # what a cross-site no-cors fetch can send without a preflight: text/plain
    status, _, body = call(live_server, "POST", "/v1/completions", raw=json.dumps({"prompt": "好"}),
                           headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(body)["error"]["message"]


def test_listening_beyond_loopback_needs_a_key(serve_ckpt, capsys, monkeypatch):
    from mingpt.serve.__main__ import access_of, build_parser, main
    monkeypatch.delenv("MINGPT_API_KEY", raising=False)
    assert main(["--ckpt", serve_ckpt, "--host", "0.0.0.0"]) == 2
    assert "--api_key" in capsys.readouterr().err
    parse = build_parser().parse_args
    assert access_of(parse(["--host", "0.0.0.0", "--insecure"])).api_keys == ()
    monkeypatch.setenv("MINGPT_API_KEY", "from-env")
    access = access_of(parse(["--host", "0.0.0.0"]))
    assert access.api_keys == ("from-env",) and access.allowed_hosts is None


def test_the_model_card_shows_no_local_path(live_server, serve_ckpt):
    card = call(live_server, "GET", "/v1/model_card")[2].decode()
    assert serve_ckpt not in card and "/tmp" not in card and "ckpt.pt" not in card


def test_the_decoder_is_the_flags_and_the_card_says_which(serve_ckpt, capsys):
    from mingpt.sample.compiled import cached_sampler_unavailable_reason
    from mingpt.serve.__main__ import build_parser, build_server, main
    for decoder in ("model", "auto"):
        app, engine = build_server(build_parser().parse_args(["--ckpt", serve_ckpt, "--decoder", decoder]),
                                   start_engine=False)
        expected = "compiled" if decoder == "auto" and cached_sampler_unavailable_reason() is None else "model"
        assert engine.batch.decoder.name == expected
        [card_route] = [route for route in app.routes if getattr(route, "path", None) == "/v1/model_card"]
        assert asyncio.run(card_route.endpoint())["decoder"] == f"continuous batching, {expected} decoder"
    with pytest.raises(SystemExit):
        main(["--ckpt", serve_ckpt, "--decoder", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_a_slow_body_is_a_408_and_frees_its_connection(serve_ckpt):
    server = LiveServer(serve_ckpt, "--body_timeout", "0.5")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\"")  # and never the rest
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
    finally:
        server.stop()


def test_faults_are_each_answered_and_the_server_serves_after(serve_ckpt):
    server = LiveServer(serve_ckpt, "--max_queue", "4")
    try:
        body = {"prompt": "难看", "sentiment": "neg", "max_tokens": 40, **PLAIN}
        # a client that leaves its stream: its sample is cancelled (the worker held meanwhile)
        from mingpt.serve.batch import RunningBatch
        release, step = threading.Event(), RunningBatch.step
        RunningBatch.step = lambda self: (release.wait(30), step(self))[1]
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True, "max_tokens": 200}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.close()  # the response holds the socket too
        connection.close()
        wait_until(lambda: all(c.request.cancelled.is_set() for c in server.engine.batch.choices),
                   "the server to notice the client leave")
        RunningBatch.step = step
        release.set()
        wait_until(lambda: server.engine.health()["cancelled_samples"] == 1, "the gone client's sample to stop")
        # a slow reader (its events left unread) does not hold up anyone else
        slow = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        slow.request("POST", "/v1/completions", json.dumps({**body, "stream": True, "max_tokens": 200, "n": 4}),
                     {"Content-Type": "application/json"})
        slow.getresponse()  # headers only
        assert call(server, "POST", "/v1/completions", body)[0] == 200
        slow.close()
        # a burst past the queue: 429s with Retry-After, then every request is served again
        server.engine.max_rows = 1  # one plain sample at a time: the queue fills
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(call(server, "POST", "/v1/completions", body)))
                   for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        statuses = sorted(status for status, _, _ in answers)
        assert len(answers) == 12 and set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        assert all(int(headers["Retry-After"]) >= 1 for status, headers, _ in answers if status == 429)
        server.engine.max_rows = 128
        assert call(server, "POST", "/v1/completions", body)[0] == 200
        # the attack inputs: each a 4xx, none a 500
        for raw in (b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}", b"[" * 60000,
                    json.dumps({"prompt": ["好"] * 8, "n": 8, "max_tokens": 256, "stop": ["a" * 65000]}).encode(),
                    json.dumps({"prompt": "好", "top_k": 2 ** 63}).encode()):
            status, _, answer = call(server, "POST", "/v1/completions", raw=raw)
            assert 400 <= status < 500 and "Traceback" not in answer.decode(), raw[:40]
        assert stream_completion("127.0.0.1", server.port, body).error is None
        # a worker crash: the request in flight ends with an error, health turns red, requests get 503s
        def crash(self):
            raise SystemExit("injected crash")

        RunningBatch.step, step = crash, RunningBatch.step
        try:
            status, _, answer = call(server, "POST", "/v1/completions", body)
            assert status == 503 and "injected crash" in json.loads(answer)["error"]["message"]
            status, _, health = call(server, "GET", "/health")
            assert status == 503 and json.loads(health)["status"] == "down"
            assert call(server, "POST", "/v1/completions", body)[0] == 503
        finally:
            RunningBatch.step = step
    finally:
        server.stop()


def test_50_clients_for_a_while_get_no_5xx(live_server):
    results, wall = run_clients("127.0.0.1", live_server.port, clients=50, requests_per_client=0,
                                body={"prompt": "难看", "sentiment": "neg", "max_tokens": 24}, timeout=60,
                                duration_s=5)
    assert len(results) >= 50 and all(r.status == 200 and r.done and r.error is None for r in results), \
        [r.error for r in results if r.error][:3]
    assert stream_completion("127.0.0.1", live_server.port, {"prompt": "好"}).error is None


def test_a_stream_left_unread_past_its_bound_is_dropped():
    from mingpt.serve.api import EventBuffer
    from mingpt.serve.engine import Event

    async def fill():
        dropped = []
        buffer = EventBuffer(3, lambda: dropped.append(True))
        for i in range(10):
            buffer.put(Event(0, text=str(i)))
        return dropped, [await buffer.get() for _ in range(4)], buffer.queue.qsize()

    dropped, events, left = asyncio.run(fill())
    assert dropped == [True] and [e.text for e in events[:3]] == ["0", "1", "2"] and left == 0
    assert events[3].index == -1 and events[3].status == 503 and "unread" in events[3].error
