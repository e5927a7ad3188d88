"""Prometheus metrics of the gateway and the kernel behind it (text exposition format)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

#: How many recent latencies the summaries' quantiles are computed over.
WINDOW = 1000


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class Metrics:
    """Counters updated by the request threads (under a lock) and rendered on /metrics."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    seconds: dict[str, deque[float]] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, status)] += 1
            self.seconds.setdefault(route, deque(maxlen=WINDOW)).append(seconds)

    def generated(self, result: dict[str, Any]) -> None:
        with self.lock:
            self.prompt_tokens += int(result["usage"]["prompt_tokens"])
            self.completion_tokens += int(result["usage"]["completion_tokens"])
            if result.get("time_to_first_token") is not None:
                self.first_token.append(float(result["time_to_first_token"]))

    def render(self, stats: dict[str, Any] | None) -> str:
        """The exposition text; kernel gauges from ``stats`` (None: the kernel is down)."""
        lines: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        with self.lock:
            metric("llmos_gateway_requests_total", "counter", "HTTP requests by route and status.",
                   [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(self.requests.items())])
            metric("llmos_gateway_request_seconds", "summary", "Request latency by route.",
                   [(f'{{route="{r}",quantile="{q}"}}', _quantile(list(v), q))
                    for r, v in sorted(self.seconds.items()) for q in (0.5, 0.99)])
            metric("llmos_gateway_prompt_tokens_total", "counter", "Prompt tokens of generations.",
                   [("", self.prompt_tokens)])
            metric("llmos_gateway_completion_tokens_total", "counter", "Tokens generated.",
                   [("", self.completion_tokens)])
            metric("llmos_gateway_time_to_first_token_seconds", "summary",
                   "Time from admission to the first generated token.",
                   [(f'{{quantile="{q}"}}', _quantile(list(self.first_token), q))
                    for q in (0.5, 0.99)])
        metric("llmos_kernel_up", "gauge", "1 if the kernel answered.", [("", 1 if stats else 0)])
        if stats:
            metric("llmos_kernel_queued_jobs", "gauge", "Jobs waiting to run.", [("", stats["queued"])])
            metric("llmos_kernel_active_jobs", "gauge", "Unfinished jobs by state.",
                   [(f'{{state="{s}"}}', n) for s, n in sorted(stats["active"].items())])
            metric("llmos_kernel_finished_jobs_total", "counter", "Finished jobs by state.",
                   [(f'{{state="{s}"}}', n) for s, n in sorted(stats["finished"].items())])
            metric("llmos_kernel_requests_total", "counter", "Syscalls received.",
                   [("", stats["received"])])
            metric("llmos_kernel_rejected_total", "counter", "Syscalls answered with an error.",
                   [("", stats["rejected"])])
            metric("llmos_kernel_rss_bytes", "gauge", "Resident memory of the kernel process.",
                   [("", stats["rss"])])
            metric("llmos_device_rss_bytes", "gauge", "Resident memory of each driver host.",
                   [(f'{{device="{d}"}}', v["rss"]) for d, v in sorted(stats["devices"].items())])
        return "\n".join(lines) + "\n"
