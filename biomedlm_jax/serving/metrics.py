"""Prometheus metrics of the server (prometheus-client), one registry per app, served at GET /metrics:

    biomedlm_http_responses_total{status}          every response, by HTTP status (refusals included)
    biomedlm_completions_total{finish_reason}      choices ended: stop, length, timeout, cancelled, error
    biomedlm_prompt_tokens_total                   prompt tokens of admitted requests
    biomedlm_generation_tokens_total               tokens generated and handed to clients
    biomedlm_time_to_first_token_seconds           request arrival -> first generated token
    biomedlm_request_latency_seconds               request arrival -> its response ends (completions)
    biomedlm_queue_time_seconds                    a prompt's wait from submit to its slot
    biomedlm_slots_busy / _slots_total / _queue_depth, biomedlm_engine_restarts_total, biomedlm_engine_healthy

Tokens per second is `rate(biomedlm_generation_tokens_total[1m])`.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the /metrics route's media type

# seconds: 10 ms .. 5 min, for TTFT and latency on CPU and accelerators alike
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, batcher):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.responses = Counter("biomedlm_http_responses", "HTTP responses by status", ["status"], registry=r)
        self.finished = Counter("biomedlm_completions", "choices ended, by finish reason", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("biomedlm_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated = Counter("biomedlm_generation_tokens", "generated tokens handed to clients", registry=r)
        self.ttft = Histogram("biomedlm_time_to_first_token_seconds", "arrival to first token", buckets=BUCKETS,
                              registry=r)
        self.latency = Histogram("biomedlm_request_latency_seconds", "arrival to end of response", buckets=BUCKETS,
                                 registry=r)
        self.queue_time = Histogram("biomedlm_queue_time_seconds", "submit to slot, per prompt", buckets=BUCKETS,
                                    registry=r)
        Gauge("biomedlm_slots_busy", "slots decoding", registry=r).set_function(lambda: batcher.active)
        Gauge("biomedlm_slots_total", "decode slots", registry=r).set_function(lambda: batcher.engine.slots)
        Gauge("biomedlm_queue_depth", "prompts waiting for a slot", registry=r).set_function(lambda: batcher.queued)
        Gauge("biomedlm_engine_restarts", "times the engine loop was restarted",
              registry=r).set_function(lambda: batcher.stats["engine_restarts"])
        Gauge("biomedlm_engine_healthy", "1 when /health answers ok",
              registry=r).set_function(lambda: float(batcher.health() is None))

    def on_admit(self, job) -> None:
        """The batcher's hook (engine thread): a prompt entered a slot."""
        self.queue_time.observe(max(0.0, job.admitted - job.submitted))
        self.prompt_tokens.inc(len(job.request.prompt))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
