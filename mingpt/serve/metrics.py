"""What `GET /metrics` shows, in Prometheus' text format: requests and errors by kind, tokens, the queue, the
running batch, time to first token, the latency between a sample's tokens, and decode steps."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The server's metrics, in a registry of its own (several servers in one process keep theirs apart)."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("mingpt_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.errors = Counter("mingpt_errors", "errors by kind: the HTTP status's name, or sample_error (a sample "
                                               "ended by a failure after its request was accepted)",
                              ["kind"], registry=registry)
        self.prompt_tokens = Counter("mingpt_prompt_tokens", "prompt tokens of accepted requests",
                                     registry=registry)
        self.completion_tokens = Counter("mingpt_completion_tokens", "tokens sent in samples", registry=registry)
        self.samples = Counter("mingpt_samples", "samples ended, by finish reason", ["finish_reason"],
                               registry=registry)
        self.queue_depth = Gauge("mingpt_queue_depth", "samples waiting to join the running batch", registry=registry)
        self.running_samples = Gauge("mingpt_running_samples", "samples in the running batch", registry=registry)
        self.batch_rows = Gauge("mingpt_batch_rows", "rows of the running batch (candidates and guidance rows count)",
                                registry=registry)
        self.engine_up = Gauge("mingpt_engine_up", "1 while the engine's worker is loaded and stepping",
                               registry=registry)
        self.time_to_first_token = Histogram("mingpt_time_to_first_token_seconds",
                                             "from a request's arrival to its sample's first text",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("mingpt_inter_token_latency_seconds",
                                             "between a sample's consecutive tokens", buckets=LATENCY_BUCKETS,
                                             registry=registry)
        self.decode_step = Histogram("mingpt_decode_step_seconds", "one step of the running batch",
                                     buckets=LATENCY_BUCKETS, registry=registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
