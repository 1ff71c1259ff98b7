"""Streaming clients for a running `mingpt.serve`, on the standard library only: each client thread sends
its requests one after another with `stream: true` and reads the server-sent events; the results give
time to first character, characters and errors. The load test of the test suite and the serve
benchmark (benchmarks/serve_load.py) both use it.
"""
import dataclasses
import http.client
import json
import statistics
import threading
import time
from typing import Optional


@dataclasses.dataclass
class StreamResult:
    status: int = 0
    first_char_s: Optional[float] = None  # from sending the request to the first character of text
    seconds: float = 0.0
    chars: int = 0
    done: bool = False  # the stream ended with [DONE]
    error: Optional[str] = None


def read_events(response):
    """The data payloads of a server-sent event stream, as they arrive."""
    while line := response.readline():
        line = line.decode("utf-8").rstrip("\r\n")
        if line.startswith("data: "):
            yield line[len("data: "):]


def stream_completion(host: str, port: int, body: dict, timeout: float = 60.0, headers=None) -> StreamResult:
    """One streamed completion, timed; headers: extra request headers (an API key's Authorization)."""
    result, started = StreamResult(), time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                           {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        result.status = response.status
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return result
        for data in read_events(response):
            if data == "[DONE]":
                result.done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = chunk["error"]["message"]
            chars = sum(len(choice["text"]) for choice in chunk.get("choices", []))
            if chars and result.first_char_s is None:
                result.first_char_s = time.perf_counter() - started
            result.chars += chars
        if not result.done and result.error is None:
            result.error = "the stream ended without [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        connection.close()
        result.seconds = time.perf_counter() - started
    return result


def run_clients(host: str, port: int, clients: int, requests_per_client: int, body, timeout: float = 60.0,
                duration_s: Optional[float] = None, headers=None):
    """`clients` threads at once, each streaming `requests_per_client` completions one after another (or, with
    duration_s, as many as it can start in that many seconds); returns (results, wall s). body: a dict, or a
    function of (client, request number) giving each request's body."""
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(clients)
    body_of = body if callable(body) else (lambda client, number: body)

    def client(index):
        barrier.wait()
        started = time.perf_counter()
        number = 0
        while (number < requests_per_client if duration_s is None else time.perf_counter() - started < duration_s):
            result = stream_completion(host, port, body_of(index, number), timeout, headers)
            number += 1
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join((duration_s or 0) + timeout * (1 if duration_s else requests_per_client) + 5)
    return results, time.perf_counter() - started


def percentile(values, q: float):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarize(results, wall_s: float) -> dict:
    """p50/p99 time to first character (ms), characters per second over the wall time, errors."""
    firsts = [r.first_char_s * 1000 for r in results if r.first_char_s is not None]
    return {"requests": len(results), "errors": sum(r.error is not None for r in results),
            "server_errors": sum(r.status >= 500 for r in results),
            "first_char_p50_ms": percentile(firsts, 50), "first_char_p99_ms": percentile(firsts, 99),
            "mean_request_s": statistics.fmean(r.seconds for r in results) if results else None,
            "chars": sum(r.chars for r in results), "chars_per_s": sum(r.chars for r in results) / wall_s,
            "wall_s": wall_s}
