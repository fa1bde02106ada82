"""Prometheus metrics, named as vLLM names them where vLLM has the metric (so its dashboards work), on a
registry of the server's own. Counters get ``_total`` appended by prometheus_client (``vllm:prompt_tokens``
is exposed as ``vllm:prompt_tokens_total``). Metrics vLLM has no name for use the ``lmforge:`` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServeMetrics:
    def __init__(self, model_name: str):
        r = self.registry = CollectorRegistry()
        lab = ["model_name"]
        self.model_name = model_name

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, lab + list(extra), registry=r)

        def counter(name, doc, extra=()):
            return Counter(name, doc, lab + list(extra), registry=r)

        def hist(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(name, doc, lab, buckets=buckets, registry=r)

        self.running = gauge("vllm:num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Sequences waiting for admission.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.success = counter("vllm:request_success", "Finished sequences by finish reason.", ["finished_reason"])
        self.ttft = hist("vllm:time_to_first_token_seconds", "Arrival to first token.")
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between two tokens of a sequence.")
        self.tpot = hist("vllm:time_per_output_token_seconds", "Same as inter_token_latency (older vLLM name).")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to last token.")
        self.queue = hist("vllm:request_queue_time_seconds", "Arrival to admission into the batch.")
        self.prompt_len = hist("vllm:request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS)
        self.gen_len = hist("vllm:request_generation_tokens", "Generated tokens per sequence.", TOKEN_BUCKETS)
        self.ready = gauge("lmforge:ready", "1 when /ready answers 200.")
        self.batch_invariant = gauge("lmforge:batch_invariant", "1 when decode rows are padded to a batch-invariant size.")
        self.min_decode_rows = gauge("lmforge:decode_min_rows", "Rows every decode step is padded to.")
        self.probe_latency = hist("lmforge:probe_latency_seconds", "Periodic one-token decode probe.")
        self.probe_failures = counter("lmforge:probe_failures", "Failed or non-finite decode probes.")
        self.rejected = counter("lmforge:rejected_requests", "Requests refused before admission.", ["reason"])

    def labels(self, metric, **kw):
        return metric.labels(model_name=self.model_name, **kw)

    def render(self) -> bytes:
        return generate_latest(self.registry)
