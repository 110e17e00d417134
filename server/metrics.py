"""Gateway metrics (own registry, ``sparsevlm_`` prefix; never ``vllm:``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# LLM latencies reach minutes: buckets well past client_python's 10 s default.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "http_4xx", "http_5xx", "protocol")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sparsevlm_requests", "Chat requests by final status.", ["model", "status"], registry=r
        )
        self.duration = Histogram(
            "sparsevlm_request_duration_seconds",
            "Gateway time per chat request.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sparsevlm_time_to_first_token_seconds",
            "Time to the first generated token (streaming), or to the response.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # modality: image or video (a fixed pair, so the label set stays small)
        self.visual_original = Counter(
            "sparsevlm_visual_tokens_original",
            "Visual tokens of the requests' images and videos without pruning.",
            ["model", "modality"],
            registry=r,
        )
        self.visual_kept = Counter(
            "sparsevlm_visual_tokens_kept",
            "Visual tokens the language model processed.",
            ["model", "modality"],
            registry=r,
        )
        self.visual_saved = Counter(
            "sparsevlm_visual_tokens_saved",
            "Visual tokens pruned away.",
            ["model", "modality"],
            registry=r,
        )
        self.flops_saved = Counter(
            "sparsevlm_prefill_flops_saved",
            "Estimated language-model prefill FLOPs avoided by pruning.",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "sparsevlm_prompt_tokens",
            "Prompt tokens of answered chat requests; pruned = the request's images were pruned.",
            ["model", "pruned"],
            registry=r,
        )
        self.prompt_tokens_cached = Counter(
            "sparsevlm_prompt_tokens_cached",
            "Prompt tokens vLLM served from its prefix cache (usage.prompt_tokens_details).",
            ["model", "pruned"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sparsevlm_requests_in_flight", "Chat requests being served.", registry=r
        )
        self.upstream_errors = Counter(
            "sparsevlm_upstream_errors", "Failed calls to the engine.", ["kind"], registry=r
        )
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind=kind)
