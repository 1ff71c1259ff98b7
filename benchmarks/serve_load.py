"""The serve benchmark: `python benchmarks/serve_load.py --ckpt out/demo [--json serve.json]`.

Starts `python -m mingpt.serve` on a loopback port (a child process; or measures one already running, --port),
then sends a mixed load: each request asks for one review at the server's sampling settings, max_tokens
drawn from 10 to 200, the two sentiments in turn. Rows: 1 and 10 closed-loop clients (each sends its next
request when its last one ends), then 50 clients for 60 s; each row reports time to first character
(p50/p99), characters/s, errors and 5xx answers. Targets: p99 first character at 10 clients <= 2x its
1-client value, 10 clients' throughput >= the batch-barrier server's, no 5xx. --with_cli adds the same
reviews through `python -m mingpt.sample` and one write_samples call, for scale.
"""
import argparse
import json
import random
import socket
import subprocess
import sys
import time
import urllib.request

from loadtest import run_clients, summarize


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, port: int, decoder: str = "auto"):
    server = subprocess.Popen([sys.executable, "-m", "mingpt.serve", "--ckpt", ckpt, "--port", str(port),
                               "--decoder", decoder])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return server
        except OSError:
            assert server.poll() is None, "the server exited"
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start")


def sample_cli(ckpt: str, reviews: int, body: dict) -> dict:
    """The same reviews through python -m mingpt.sample in one process; the time includes loading."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mingpt.sample", "--ckpt", ckpt, "--start", body["prompt"],
                          "--sentiment", body["sentiment"], "--num_samples", str(reviews), "--max_new_tokens",
                          str(body["max_tokens"]), "--temperature", str(body["temperature"])],
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    chars = sum(len(line) - len(body["prompt"]) for line in out.splitlines())
    return {"clients": "sample CLI", "requests": reviews, "errors": 0, "first_char_p50_ms": None,
            "first_char_p99_ms": None, "chars": chars, "chars_per_s": chars / wall, "wall_s": wall}


def write_samples_in_process(ckpt: str, reviews: int, body: dict) -> dict:
    """The same reviews as one write_samples batch in this process: sample's generation without start-up."""
    from mingpt import SamplingSettings, load, write_samples
    loaded = load(ckpt)
    started = time.perf_counter()
    samples = write_samples(loaded.model, loaded.tokenizer, loaded.layout, body["prompt"], body["sentiment"], reviews,
                            body["max_tokens"], SamplingSettings(temperature=body["temperature"]))
    wall = time.perf_counter() - started
    chars = sum(len(text) - len(body["prompt"]) for _, text in samples)
    return {"clients": "write_samples, one batch", "requests": reviews, "errors": 0, "first_char_p50_ms": None,
            "first_char_p99_ms": None, "chars": chars, "chars_per_s": chars / wall, "wall_s": wall}


def mixed_load(settings: dict):
    """The requests of the mixed load: max_tokens from 10 to 200, the two sentiments in turn, the server's
    settings but those given."""
    def body(client: int, number: int) -> dict:
        rng = random.Random(client * 100_003 + number)
        sentiment = ("pos", "neg")[(client + number) % 2]
        return {"prompt": {"pos": "好看", "neg": "难看"}[sentiment], "sentiment": sentiment,
                "max_tokens": rng.randint(10, 200), **settings}
    return body


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="start python -m mingpt.serve on this checkpoint")
    p.add_argument("--port", type=int, default=None, help="or measure a server already listening on this port")
    p.add_argument("--decoder", default="auto", help="the started server's --decoder (auto, compiled, model)")
    p.add_argument("--api_key", default=None, help="the server's key, if it has one")
    p.add_argument("--clients", default="1,10", help="closed-loop rows: this many clients at once")
    p.add_argument("--requests", type=int, default=40, help="reviews per closed-loop row (each client its share)")
    p.add_argument("--burst_clients", type=int, default=50, help="the sustained row: this many clients ...")
    p.add_argument("--burst_s", type=float, default=60.0, help="... for this many seconds (0: no such row)")
    p.add_argument("--candidates", type=int, default=None,
                   help="each request's candidates (default: the server's); 1 streams each sample token by token")
    p.add_argument("--with_cli", action="store_true", help="also the same reviews through the sample CLI")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if (args.ckpt is None) == (args.port is None):
        p.error("give --ckpt (start a server) or --port (a running one)")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    mixed_body = mixed_load({} if args.candidates is None else {"candidates": args.candidates})
    port = args.port or free_port()
    server = start_server(args.ckpt, port, args.decoder) if args.ckpt else None
    rows = []
    try:
        for clients in map(int, args.clients.split(",")):
            results, wall = run_clients("127.0.0.1", port, clients, max(1, args.requests // clients), mixed_body,
                                        timeout=300, headers=headers)
            rows.append({"clients": clients, **summarize(results, wall)})
        if args.burst_s:
            results, wall = run_clients("127.0.0.1", port, args.burst_clients, 0, mixed_body, timeout=300,
                                        duration_s=args.burst_s, headers=headers)
            rows.append({"clients": f"{args.burst_clients}, {args.burst_s:.0f} s", **summarize(results, wall)})
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    if args.with_cli and args.ckpt:
        body = {"prompt": "难看", "sentiment": "neg", "max_tokens": 60, "temperature": 1.0}
        rows.append(sample_cli(args.ckpt, args.requests, body))
        rows.append(write_samples_in_process(args.ckpt, args.requests, body))
    print("| clients | reviews | errors | 5xx | first char p50 ms | p99 ms | chars | chars/s | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v: "–" if v is None else (f"{v:,.0f}" if isinstance(v, float) else str(v))
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r.get('server_errors', 0)} | "
              f"{fmt(r['first_char_p50_ms'])} | {fmt(r['first_char_p99_ms'])} | {r['chars']} | "
              f"{fmt(r['chars_per_s'])} | {r['wall_s']:.1f} |")
    one = next((r for r in rows if r["clients"] == 1), None)
    ten = next((r for r in rows if r["clients"] == 10), None)
    if one and ten and one["first_char_p99_ms"] and ten["first_char_p99_ms"]:
        print(f"p99 first character, 10 clients / 1 client: "
              f"{ten['first_char_p99_ms'] / one['first_char_p99_ms']:.2f}x (target <= 2x); "
              f"throughput 10 / 1: {ten['chars_per_s'] / one['chars_per_s']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
