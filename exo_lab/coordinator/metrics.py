"""The cluster's own counters: what /metrics exports, what the widget and plots read.

Shared by every client, so nothing here may tell one client about another's prompts or outputs:
counts of requests, tokens and steps, and timings, are exported; how many prompt tokens a
request reused from a cached prefix (which measures how far it matched a cached prompt) stays in
this process (``prefix_tokens_total``, for the notebook) and is neither on /metrics nor in the
status. Per-client load is shown by opaque labels only (``clients``).
"""
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
    dropped_total: int = 0                                  # data-plane messages dropped
    kv_slots: int = 1                                       # KV slots per stage (max_batch)
    running: int = 0                                        # requests holding a KV slot
    queued: int = 0                                         # requests waiting for one
    prefix_hits_total: int = 0                              # requests that reused a slot's KV prefix
    prefix_tokens_total: int = 0                            # prompt tokens not prefilled thanks to it (not exported)
    preempted_total: int = 0                                # requests whose slot went to a client with fewer
    clients: list = field(default_factory=list)             # [{"client": label, "running", "queued"}]
    steps_total: int = 0                                    # micro-batches sent down the pipe
    failovers_total: int = 0                                # pipelines lost and re-planned
    replayed_total: int = 0                                 # requests replayed after one
    rebalances_total: int = 0                               # layers moved while serving
    last_rebalance_pause_s: float | None = None             # the last move's pause
    refused_steps_total: int = 0                            # steps a stage refused: its PC was short of memory
    sheds_total: int = 0                                    # times the stages shed KV slots for memory
    last_memory_pause_s: float | None = None                # the last shed's (or give-back's) pause
    last_pause_s: float | None = None                       # failure detected -> pipeline back
    step_rows_total: int = 0                                # rows in them (mean batch = rows / steps)
    step_rows_max: int = 0                                  # the most rows one step carried
    tokens_total: int = 0
    draft_tokens_total: int = 0                             # speculation: drafts verified
    draft_accepted_total: int = 0                           # of them, accepted
    verify_rows_total: int = 0                              # verify rows (trips of one request)
    draft_seconds_total: float = 0.0                        # speculation: time the draft model took
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

    def dropped(self) -> None:
        self.dropped_total += 1

    def prefix_hit(self, tokens: int) -> None:
        self.prefix_hits_total += 1
        self.prefix_tokens_total += tokens

    def preempted(self) -> None:
        self.preempted_total += 1

    def failover(self, replayed: int) -> None:
        self.failovers_total += 1
        self.replayed_total += replayed

    def rebalanced(self) -> None:
        self.rebalances_total += 1

    def resumed(self, pause_s: float, *, why: str = "failover") -> None:
        """The pipeline serves again after a pause for ``why`` (as Scheduler.suspend's)."""
        if why == "rebalance":
            self.last_rebalance_pause_s = pause_s
        elif why == "memory":
            self.last_memory_pause_s = pause_s
        else:
            self.last_pause_s = pause_s

    def memory_short(self) -> None:
        self.refused_steps_total += 1

    def shed(self, slots: int) -> None:
        """The stages hold ``slots`` KV slots now (fewer: shed; more: given back)."""
        self.sheds_total += slots < self.kv_slots
        self.kv_slots = slots

    def step(self, rows: int) -> None:
        self.steps_total += 1
        self.step_rows_total += rows
        self.step_rows_max = max(self.step_rows_max, rows)

    def speculated(self, drafted: int, accepted: int, rows: int) -> None:
        """A verify step: ``rows`` verify rows, ``drafted`` draft tokens, ``accepted`` of them."""
        self.draft_tokens_total += drafted
        self.draft_accepted_total += accepted
        self.verify_rows_total += rows

    def stage_mean_ms(self, index: int) -> float | None:
        """Stage ``index``'s mean step as its tokens reported it, or None before any."""
        count = self.stage_ms_count.get(index)
        return self.stage_ms_sum[index] / count if count else None

    @property
    def acceptance_rate(self) -> float | None:
        """Drafts accepted / drafts verified, or None before any."""
        return self.draft_accepted_total / self.draft_tokens_total if self.draft_tokens_total else None

    @property
    def tokens_per_trip(self) -> float | None:
        """Tokens a verify row yields on average (its accepted drafts and one sample)."""
        return (self.draft_accepted_total + self.verify_rows_total) / self.verify_rows_total \
            if self.verify_rows_total else None

    def set_load(self, running: int, queued: int, clients: list | None = None) -> None:
        """Requests running and waiting now; ``clients``: the same per client (opaque labels)."""
        self.running, self.queued = running, queued
        if clients is not None:
            self.clients = clients

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
            "dropped_messages_total": self.dropped_total,
            "running": self.running,
            "queued": self.queued,
            "kv_slots": self.kv_slots,
            "prefix_hits_total": self.prefix_hits_total,
            "preempted_total": self.preempted_total,
            "mean_batch_rows": self.step_rows_total / self.steps_total if self.steps_total else None,
            "failovers_total": self.failovers_total,
            "replayed_requests_total": self.replayed_total,
            "last_failover_pause_s": self.last_pause_s,
            "rebalances_total": self.rebalances_total,
            "last_rebalance_pause_s": self.last_rebalance_pause_s,
            "refused_steps_total": self.refused_steps_total,
            "sheds_total": self.sheds_total,
            "last_memory_pause_s": self.last_memory_pause_s,
            "tokens_total": self.tokens_total,
            "tokens_per_s": self.tokens_per_s(),
            "mean_time_to_first_token_s": self.ttft_sum_s / self.ttft_count if self.ttft_count else None,
            "stage_mean_ms": {i: self.stage_mean_ms(i) for i in self.stage_ms_sum},
            "draft_tokens_total": self.draft_tokens_total,
            "draft_acceptance_rate": self.acceptance_rate,
            "tokens_per_verify_trip": self.tokens_per_trip,
            "draft_seconds_total": self.draft_seconds_total,
        }


class MetricsCollector:
    """A prometheus_client collector that reads the loaded model's Metrics at scrape time (the
    counters stay plain fields that the widget reads too). ``source()`` returns
    ``(metrics, model id)``, or None while no model is loaded."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        current = self.source()
        if current is None:
            return
        m, model = current
        labels = ["model"]
        yield _family(CounterMetricFamily, "exo_lab_requests", "Generation requests received.", m.requests_total, model)
        finished = CounterMetricFamily("exo_lab_requests_finished", "Requests finished, by finish reason.",
                                       labels=["model", "reason"])
        for reason, count in sorted(m.requests_finished.items()):
            finished.add_metric([model, reason], count)
        yield finished
        yield _family(GaugeMetricFamily, "exo_lab_requests_in_flight", "Requests being generated now.", m.in_flight, model)
        yield _family(CounterMetricFamily, "exo_lab_errors", "Requests that ended with an error.", m.errors_total, model)
        yield _family(CounterMetricFamily, "exo_lab_tokens_generated", "Tokens generated.", m.tokens_total, model)
        yield _family(CounterMetricFamily, "exo_lab_dropped_messages",
                      "Data-plane messages dropped: malformed, forged, or for no live request.", m.dropped_total, model)
        yield _family(GaugeMetricFamily, "exo_lab_requests_running", "Requests holding a KV slot.", m.running, model)
        yield _family(GaugeMetricFamily, "exo_lab_requests_queued", "Requests waiting for a KV slot.", m.queued, model)
        yield _family(GaugeMetricFamily, "exo_lab_kv_slots", "KV slots per stage (max_batch).", m.kv_slots, model)
        yield _family(CounterMetricFamily, "exo_lab_prefix_cache_hits",
                      "Requests that reused the KV of an earlier request's token prefix.", m.prefix_hits_total, model)
        yield _family(CounterMetricFamily, "exo_lab_preempted_requests",
                      "Requests whose KV slot was taken back for a client holding fewer (they replay).",
                      m.preempted_total, model)
        yield _family(CounterMetricFamily, "exo_lab_steps", "Micro-batches sent down the pipeline.", m.steps_total, model)
        yield _family(CounterMetricFamily, "exo_lab_draft_tokens", "Speculative decoding: draft tokens verified.",
                      m.draft_tokens_total, model)
        yield _family(CounterMetricFamily, "exo_lab_draft_tokens_accepted",
                      "Speculative decoding: draft tokens accepted.", m.draft_accepted_total, model)
        yield _family(CounterMetricFamily, "exo_lab_verify_rows",
                      "Speculative decoding: verify rows (one request's trip through the pipeline).",
                      m.verify_rows_total, model)
        yield _family(CounterMetricFamily, "exo_lab_draft_seconds",
                      "Speculative decoding: time the draft model spent drafting.", m.draft_seconds_total, model)
        yield _family(CounterMetricFamily, "exo_lab_step_rows", "Rows (sequences) in those micro-batches.",
                      m.step_rows_total, model)
        yield _family(CounterMetricFamily, "exo_lab_failovers", "Pipelines lost and re-planned on the survivors.",
                      m.failovers_total, model)
        yield _family(CounterMetricFamily, "exo_lab_replayed_requests", "Requests replayed after a failover.",
                      m.replayed_total, model)
        yield _family(CounterMetricFamily, "exo_lab_rebalances",
                      "Layers moved while serving because a PC got busier or freer (streams replayed).",
                      m.rebalances_total, model)
        yield _family(CounterMetricFamily, "exo_lab_memory_refused_steps",
                      "Steps a stage refused before allocating because its PC was short of memory (replayed).",
                      m.refused_steps_total, model)
        yield _family(CounterMetricFamily, "exo_lab_memory_sheds",
                      "Times the stages shed KV slots because a PC was short of memory.", m.sheds_total, model)
        yield _family(GaugeMetricFamily, "exo_lab_failover_pause_seconds",
                      "From the last failure's detection to the pipeline serving again.", m.last_pause_s or 0.0, model)
        yield _family(GaugeMetricFamily, "exo_lab_tokens_per_second", "Tokens generated per second over the last 2 s.",
                      m.tokens_per_s(), model)
        ttft = SummaryMetricFamily("exo_lab_time_to_first_token_seconds", "Time from request to first token.",
                                   labels=labels)
        ttft.add_metric([model], count_value=m.ttft_count, sum_value=m.ttft_sum_s)
        yield ttft
        stage = SummaryMetricFamily("exo_lab_stage_forward_milliseconds", "Forward time per token step, per stage.",
                                    labels=["model", "stage"])
        for index in sorted(m.stage_ms_sum):
            stage.add_metric([model, str(index)], count_value=m.stage_ms_count[index],
                             sum_value=m.stage_ms_sum[index])
        yield stage


def _family(cls, name: str, documentation: str, value: float, model: str):
    family = cls(name, documentation, labels=["model"])
    family.add_metric([model], value)
    return family
