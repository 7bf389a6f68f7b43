"""The cluster's own counters: what /metrics exports, what the widget and plots read."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Counters and short histories; updated on the scheduler's loop, read from anywhere."""

    requests_total: int = 0
    requests_finished: dict = field(default_factory=dict)   # finish_reason -> count
    errors_total: int = 0
    tokens_total: int = 0
    in_flight: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    stage_ms_sum: dict = field(default_factory=dict)        # stage index -> summed ms
    stage_ms_count: dict = field(default_factory=dict)
    token_times: deque = field(default_factory=lambda: deque(maxlen=4096))  # wall-clock time of each token
    history: deque = field(default_factory=lambda: deque(maxlen=3600))      # (time, tokens/s, in_flight)

    def request_started(self) -> None:
        self.requests_total += 1
        self.in_flight += 1

    def request_finished(self, finish_reason: str | None, elapsed_s: float) -> None:
        self.in_flight -= 1
        reason = finish_reason or "aborted"
        self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1

    def error(self) -> None:
        self.errors_total += 1

    def first_token(self, elapsed_s: float) -> None:
        self.ttft_sum_s += elapsed_s
        self.ttft_count += 1

    def token(self, stage_ms: list[float]) -> None:
        self.tokens_total += 1
        self.token_times.append(time.time())
        for index, ms in enumerate(stage_ms):
            self.stage_ms_sum[index] = self.stage_ms_sum.get(index, 0.0) + ms
            self.stage_ms_count[index] = self.stage_ms_count.get(index, 0) + 1

    def tokens_per_s(self, window_s: float = 2.0) -> float:
        """Tokens generated per second over the last window_s seconds (all requests)."""
        now = time.time()
        recent = sum(1 for t in self.token_times if t >= now - window_s)
        return recent / window_s

    def sample(self) -> tuple[float, float, int]:
        """Append and return (time, tokens/s, in_flight) to the history used by plots."""
        point = (time.time(), self.tokens_per_s(), self.in_flight)
        self.history.append(point)
        return point

    def snapshot(self) -> dict:
        return {
            "requests_total": self.requests_total,
            "requests_in_flight": self.in_flight,
            "errors_total": self.errors_total,
            "tokens_total": self.tokens_total,
            "tokens_per_s": self.tokens_per_s(),
            "mean_time_to_first_token_s": self.ttft_sum_s / self.ttft_count if self.ttft_count else None,
            "stage_mean_ms": {i: self.stage_ms_sum[i] / self.stage_ms_count[i] for i in self.stage_ms_sum},
        }

    def prometheus(self, model: str) -> str:
        """Render in the Prometheus text exposition format (version 0.0.4)."""
        label = f'model="{_escape(model)}"'
        lines = [
            "# HELP exo_lab_requests_total Generation requests received.",
            "# TYPE exo_lab_requests_total counter",
            f"exo_lab_requests_total{{{label}}} {self.requests_total}",
            "# HELP exo_lab_requests_finished_total Requests finished, by finish reason.",
            "# TYPE exo_lab_requests_finished_total counter",
            *[f'exo_lab_requests_finished_total{{{label},reason="{r}"}} {n}'
              for r, n in sorted(self.requests_finished.items())],
            "# HELP exo_lab_requests_in_flight Requests being generated now.",
            "# TYPE exo_lab_requests_in_flight gauge",
            f"exo_lab_requests_in_flight{{{label}}} {self.in_flight}",
            "# HELP exo_lab_errors_total Requests that ended with an error.",
            "# TYPE exo_lab_errors_total counter",
            f"exo_lab_errors_total{{{label}}} {self.errors_total}",
            "# HELP exo_lab_tokens_generated_total Tokens generated.",
            "# TYPE exo_lab_tokens_generated_total counter",
            f"exo_lab_tokens_generated_total{{{label}}} {self.tokens_total}",
            "# HELP exo_lab_tokens_per_second Tokens generated per second over the last 2 s.",
            "# TYPE exo_lab_tokens_per_second gauge",
            f"exo_lab_tokens_per_second{{{label}}} {self.tokens_per_s():.3f}",
            "# HELP exo_lab_time_to_first_token_seconds Time from request to first token.",
            "# TYPE exo_lab_time_to_first_token_seconds summary",
            f"exo_lab_time_to_first_token_seconds_sum{{{label}}} {self.ttft_sum_s:.6f}",
            f"exo_lab_time_to_first_token_seconds_count{{{label}}} {self.ttft_count}",
            "# HELP exo_lab_stage_forward_milliseconds Forward time per token step, per stage.",
            "# TYPE exo_lab_stage_forward_milliseconds summary",
        ]
        for index in sorted(self.stage_ms_sum):
            stage = f'{label},stage="{index}"'
            lines.append(f"exo_lab_stage_forward_milliseconds_sum{{{stage}}} {self.stage_ms_sum[index]:.3f}")
            lines.append(f"exo_lab_stage_forward_milliseconds_count{{{stage}}} {self.stage_ms_count[index]}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
