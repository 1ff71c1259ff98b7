"""Streaming and serving against the real thing: the sample CLI's --stream and --interactive, the
batching engine, and a live `mingpt.serve` on a loopback port driven by the official `openai` client,
raw HTTP with bad input, and a bounded load of concurrent streaming clients."""
import http.client
import io
import json
import threading

import pytest
import torch

from conftest import LiveServer, wait_until
from mingpt.checkpoint import load
from mingpt.data.layouts import get_layout
from loadtest import run_clients, stream_completion, summarize
from mingpt.sample.engine import generate, generate_stream
from mingpt.sample.streaming import IncrementalDecoder, TextStream
from mingpt.tokenizer import BPETokenizer, CharTokenizer
from mingpt.sample.settings import SamplingSettings

# The engine's batching tests guide each sample (it runs as two rows) and draw one candidate, whatever the
# defaults are.
GUIDED = SamplingSettings(temperature=1.25, top_p=0.98, guidance=8.0, guidance_tokens=8, guidance_after=1.5,
                          no_repeat_ngram_size=2, candidates=1)


def post(server, body, raw=None, headers=None):
    """(status, headers, JSON body) of a POST /v1/completions."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", raw if raw is not None else json.dumps(body),
                       {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.msg, json.loads(data)


def get(server, path):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.getheader("Content-Type"), response.read()


# --- streaming in sampling and the sample CLI -------------------------------------------------------

def test_incremental_decoder_never_splits_a_character():
    texts = ["好看的电影！", "abc 难看"]
    bpe = BPETokenizer.train(texts * 20, vocab_size=300)
    for tokenizer in (bpe, CharTokenizer.train(texts)):
        for text in texts:
            decoder, pieces = IncrementalDecoder(tokenizer), []
            for token in tokenizer.encode(text):
                piece = decoder.feed(token)
                assert "\ufffd" not in piece
                pieces.append(piece)
            assert "".join(pieces) == text
    # a byte-level token that ends mid-character is held back until the character is whole
    byte_ids = [bpe.hf.token_to_id(ch) for ch in "å¥½"]  # the byte-level spelling of 好: e5 a5 bd
    decoder = IncrementalDecoder(bpe)
    assert [decoder.feed(i) for i in byte_ids] == ["", "", "好"]


def test_generate_stream_yields_the_columns_of_generate_and_stops_when_closed(serve_ckpt):
    model = load(serve_ckpt).model
    idx = torch.tensor([[1, 3, 7], [1, 4, 8]])
    expected = generate(model, idx, 12, SamplingSettings.plain(temperature=0.8), seed=5)
    columns = list(generate_stream(model, idx, 12, SamplingSettings.plain(temperature=0.8), seed=5))
    assert torch.equal(torch.tensor(columns).T, expected[:, 3:])
    stream = generate_stream(model, idx, 200, SamplingSettings.plain(temperature=0.8), seed=5)
    assert len(next(stream)) == 2
    stream.close()  # the generation thread stops at its next step and is joined


def test_sample_stream_prints_what_the_unstreamed_cli_prints(serve_ckpt, capsys):
    from mingpt.sample.__main__ import main
    flags = ["--ckpt", serve_ckpt, "--start", "好看", "--num_samples", "3", "--max_new_tokens", "15",
             "--seed", "3", "--verbose"]
    assert main(flags) == 0
    plain = capsys.readouterr().out
    assert main(flags + ["--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert len(plain.splitlines()) == 3 and all(line.startswith("[") for line in plain.splitlines())


def test_interactive_reads_prompts_and_commands(serve_ckpt):
    from mingpt.sample.__main__ import build_parser, interactive
    parser = build_parser()
    args = parser.parse_args(["--ckpt", serve_ckpt, "--num_samples", "1", "--max_new_tokens", "8", "--seed", "1"])
    loaded = load(serve_ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    out = io.StringIO()
    lines = io.StringIO("好看\n:neg\n:temperature 0\n:num_samples 2\n难看\n:top_k x\n:nope\n:quit\n不会读到\n")
    interactive(model, tokenizer, get_layout("review"), args, parser, lines, out)
    text = out.getvalue()
    assert args.sentiment == "neg" and args.temperature == 0 and args.num_samples == 2
    answers = [line.lstrip("> ") for line in text.splitlines()[1:] if "看" in line]
    assert answers[0].startswith("好看") and answers[1].startswith("难看") and answers[1] == answers[2]  # greedy
    assert "unknown command :nope" in text and "不会读到" not in text
    assert "error: argument --top_k: invalid int value: 'x'" in text


def test_stop_strings_are_cut_and_held_back():
    """The server's rule (OpenAI's): the text ends before the stop string, and text that may still grow into
    one is held back; the CLI's (Hugging Face's): the text keeps it, and nothing is held back."""
    tokenizer = CharTokenizer.train(["好看难过，。吗"])
    ids = tokenizer.encode("好看难过，难看吗")
    stream = TextStream(tokenizer, stops=("难看", "。"), keep_stop=False)
    sent = [stream.feed(token) for token in ids[:7]]
    assert sent == ["好", "看", "", "难过", "，", "", ""] and stream.ended  # 难 may grow into 难看
    assert stream.feed(ids[7]) == "" and stream.text[:stream.sent] == "好看难过，"
    kept = TextStream(tokenizer, stops=("难看", "。"), keep_stop=True, prefix="难")  # the prompt counts for nothing
    assert [kept.feed(token) for token in ids] == ["好", "看", "难", "过", "，", "难", "看", ""] and kept.ended
    assert kept.text[:kept.sent] == "难好看难过，难看"


# --- the live server ----------------------------------------------------------------------------

def test_openai_client_completes_and_streams(live_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    [model] = client.models.list().data
    done = client.completions.create(model=model.id, prompt="好看", max_tokens=20, n=2, seed=7, temperature=1.0,
                                     extra_body={"sentiment": "neg"})
    assert len(done.choices) == 2 and {c.finish_reason for c in done.choices} <= {"stop", "length"}
    assert done.usage.completion_tokens >= 2 and done.usage.prompt_tokens == 4
    again = client.completions.create(model=model.id, prompt="好看", max_tokens=20, n=2, seed=7, temperature=1.0,
                                      extra_body={"sentiment": "neg"})
    assert [c.text for c in again.choices] == [c.text for c in done.choices]  # the seed reproduces
    chunks = list(client.completions.create(model=model.id, prompt=["难看", "好看"], max_tokens=30, stream=True,
                                            seed=3, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert len(chunks) > 3 and chunks[-1].usage.total_tokens > 4
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 2
    unstreamed = client.completions.create(model=model.id, prompt=["难看", "好看"], max_tokens=30, seed=3)
    assert [texts[0], texts[1]] == [c.text for c in unstreamed.choices]


def test_models_health_model_card_and_the_page(live_server):
    status, kind, body = get(live_server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    card = json.loads(get(live_server, "/v1/model_card")[2])
    assert card["vocab_size"] == card["config"]["vocab_size"] > 10 and card["data"]["source"] == "synthetic reviews"
    status, kind, page = get(live_server, "/")
    assert status == 200 and kind.startswith("text/html")
    assert b"/v1/completions" in page and b"http://" not in page and b"https://" not in page  # nothing external


def test_sampling_controls_reach_the_sampler(live_server):
    body = {"prompt": "难看", "sentiment": "neg", "max_tokens": 16, "temperature": 0, "n": 2}
    _, _, plain = post(live_server, body)
    status, _, guided = post(live_server, {**body, "guidance": 3, "guidance_tokens": 0, "repetition_penalty": 1.5,
                                           "no_repeat_ngram_size": 2})
    assert status == 200 and guided["choices"][0]["text"] == guided["choices"][1]["text"]  # greedy
    assert guided["choices"][0]["text"] != plain["choices"][0]["text"]
    text = guided["choices"][0]["text"]
    assert len({text[i:i + 2] for i in range(len(text) - 1)}) == len(text) - 1  # no bigram twice


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "好看@"}, "prompt"),  # a character outside the vocabulary
    ({"prompt": "好" * 300}, "prompt"),
    ({"prompt": "好", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "好", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "好", "n": 99}, "n"),
    ({"prompt": "好", "n": True}, "n"),
    ({"prompt": "好", "temperature": "hot"}, "temperature"),
    ({"prompt": "好", "temperature": -1}, "temperature"),
    ({"prompt": "好", "top_p": 0}, "top_p"),
    ({"prompt": "好", "sentiment": "happy"}, "sentiment"),
    ({"prompt": "好", "stop": [1]}, "stop"),
    ({"prompt": "好", "stream": "yes"}, "stream"),
    ({"prompt": "好", "logprobs": 6}, "logprobs"),
    ({"prompt": "好", "logprobs": -1}, "logprobs"),
    # inputs that once gave a 500 (each its finding in issue 28)
    ({"prompt": "好", "no_repeat_ngram_size": 100}, "no_repeat_ngram_size"),  # above the model's block
    ({"prompt": "好", "guidance_tokens": 3000000000}, "guidance_tokens"),
    ({"prompt": "好", "top_k": 9223372036854775808}, "top_k"),
    ({"prompt": "好", "stop": ["a" * 65]}, "stop"),  # past the cap on a stop string's length
    ({"prompt": "好", "guidance": -1}, "guidance"),
    ({"prompt": "好", "guide_against": "neutral"}, "guide_against"),
    ({"prompt": "好", "guidance_tokens": -1}, "guidance_tokens"),
    ({"prompt": "好", "guidance_tokens": 1.5}, "guidance_tokens"),
    ({"prompt": "好", "guidance_after": -1}, "guidance_after"),
    ({"prompt": "好", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "好", "no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"prompt": "好", "candidates": 0}, "candidates"),
    ({"prompt": "好", "candidates": 17}, "candidates"),  # within the settings' range, past the server's cap
])
def test_bad_input_is_a_400_naming_the_field(live_server, body, param):
    status, _, error = post(live_server, body)
    assert status == 400 and error["error"]["param"] == param and error["error"]["message"]


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"\xff\xfe", b"",
                                 b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}",  # an integer of 5,001 digits
                                 b"[" * 60000])  # nesting past the parser's recursion
def test_malformed_bodies_are_a_400(live_server, raw):
    status, _, error = post(live_server, None, raw=raw)
    assert status == 400 and "Traceback" not in error["error"]["message"]


def test_a_body_over_the_limit_is_a_413(live_server):
    status, _, error = post(live_server, {"prompt": "好", "pad": "x" * 70000})
    assert status == 413 and "bytes" in error["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after_and_a_gone_client_is_dropped(serve_ckpt):
    server = LiveServer(serve_ckpt, "--max_queue", "2", start_engine=False)  # the worker waits until we start it
    try:
        held = []
        waiter = threading.Thread(target=lambda: held.append(post(server, {"prompt": "好", "n": 2, "max_tokens": 5})))
        waiter.start()
        wait_until(lambda: server.engine.health()["queued"] == 2, "the first request to queue")
        status, headers, error = post(server, {"prompt": "好"})
        assert status == 429 and int(headers["Retry-After"]) >= 1 and "queue" in error["error"]["message"]
        # a streaming client that goes away while queued: its samples never run
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        server.engine.max_queue = 4
        connection.request("POST", "/v1/completions", json.dumps({"prompt": "难", "stream": True, "n": 2}),
                           {"Content-Type": "application/json"})
        wait_until(lambda: server.engine.health()["queued"] == 4, "the streaming request to queue")
        connection.sock.close()
        wait_until(lambda: all(c.request.cancelled.is_set() for c in list(server.engine.pending)[2:]),
                   "the server to notice the client leave", timeout=10)
        server.engine.start()
        waiter.join(30)
        assert not waiter.is_alive(), "the held request did not end"
        assert held and held[0][0] == 200 and len(held[0][2]["choices"]) == 2
        assert server.engine.health()["cancelled_samples"] == 2
    finally:
        server.stop()


def test_load_50_concurrent_streaming_clients_without_an_error(live_server):
    body = {"prompt": "难看", "sentiment": "neg", "max_tokens": 24, "temperature": 1.0}
    results, wall = run_clients("127.0.0.1", live_server.port, clients=50, requests_per_client=2, body=body,
                                timeout=60)
    summary = summarize(results, wall)
    assert summary["requests"] == 100 and summary["errors"] == 0, [r.error for r in results if r.error][:3]
    # the untrained test model may end a review at its first token: such a stream has no first character
    assert all(r.done and (r.first_char_s is not None) == (r.chars > 0) for r in results)
    assert summary["chars"] > 0
    assert stream_completion("127.0.0.1", live_server.port, body).error is None  # still serving
