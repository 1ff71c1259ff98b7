"""The serve benchmark: `python benchmarks/serve_load.py --ckpt out/demo [--json serve.json]`.

Starts `python -m mingpt.serve` on a loopback port (a child process), then for 1, 10 and 50 concurrent
streaming clients sends a fixed number of reviews and reports time to first character (p50/p99) and
characters/s; beside it, the same number of reviews through `python -m mingpt.sample` in one process
(one batch; its wall time includes the interpreter's and torch's start-up), and as one write_samples
call in this process (the generation alone). Batching should give 10 clients at least 3x the characters/s of one.
"""
import argparse
import json
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


def start_server(ckpt: str, port: int):
    server = subprocess.Popen([sys.executable, "-m", "mingpt.serve", "--ckpt", ckpt, "--port", str(port),
                               "--max_batch", "64"])
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--clients", default="1,10,50")
    p.add_argument("--requests", type=int, default=100, help="reviews per row (each client sends its share)")
    p.add_argument("--max_tokens", type=int, default=60)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    body = {"prompt": "难看", "sentiment": "neg", "max_tokens": args.max_tokens, "temperature": 1.0}
    port = free_port()
    server = start_server(args.ckpt, port)
    rows = []
    try:
        for clients in map(int, args.clients.split(",")):
            results, wall = run_clients("127.0.0.1", port, clients, max(1, args.requests // clients), body)
            rows.append({"clients": clients, **summarize(results, wall)})
    finally:
        server.terminate()
        server.wait(30)
    rows.append(sample_cli(args.ckpt, args.requests, body))
    rows.append(write_samples_in_process(args.ckpt, args.requests, body))
    print("| clients | reviews | errors | first char p50 ms | p99 ms | chars | chars/s | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v: "–" if v is None else (f"{v:.0f}" if isinstance(v, float) else str(v))
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {fmt(r['first_char_p50_ms'])} | "
              f"{fmt(r['first_char_p99_ms'])} | {r['chars']} | {fmt(r['chars_per_s'])} | {r['wall_s']:.1f} |")
    one = next((r for r in rows if r["clients"] == 1), None)
    ten = next((r for r in rows if r["clients"] == 10), None)
    if one and ten:
        print(f"10 clients / 1 client throughput: {ten['chars_per_s'] / one['chars_per_s']:.1f}x (target >= 3x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
