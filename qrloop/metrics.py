"""Prometheus metrics of every qrloop process, declared once so names and labels stay consistent."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUERIES_SERVED = Counter("qrloop_queries_served_total", "Queries rewritten and published", ["arm"])
INTERACTIONS = Counter(
    "qrloop_interactions_total", "Interactions seen by the aggregator, by what happened to them", ["outcome"]
)
PAIRS_EMITTED = Counter("qrloop_pairs_emitted_total", "Preference pairs emitted by the aggregator")
TIES = Counter("qrloop_ties_total", "Queries whose two rewrites scored within the margin (not emitted)")
WINDOWS_CLOSED = Counter("qrloop_windows_closed_total", "Attribution windows closed", ["reason"])
DEAD_LETTERS = Counter("qrloop_dead_letters_total", "Messages sent to the dead-letter topic", ["reason"])
DPO_STEPS = Counter("qrloop_dpo_steps_total", "DPO steps taken by the learner")
DPO_STEP_SECONDS = Histogram(
    "qrloop_dpo_step_seconds", "Wall time of one DPO step", buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 40, 80)
)
DPO_LOSS = Gauge("qrloop_dpo_loss", "Loss of the last DPO step")
DPO_MARGIN = Gauge("qrloop_dpo_margin", "Mean implicit-reward margin (chosen - rejected) of the last step")
ALIAS_VERSION = Gauge("qrloop_alias_version", "Version an alias points at", ["alias"])
CONSUMER_LAG = Gauge(
    "qrloop_consumer_lag", "Messages not yet consumed (end offset - position)", ["role", "topic", "partition"]
)
REQUESTS_REFUSED = Counter(
    "qrloop_rewriter_requests_refused_total",
    "/rewrite requests answered with an error, by status",
    ["status"],
)
SETTINGS_RELOADS = Counter(
    "qrloop_settings_reloads_total",
    "SIGHUP settings reloads, applied or refused (old settings kept)",
    ["role", "outcome"],
)
OFFSETS_OUT_OF_RANGE = Counter(
    "qrloop_offsets_out_of_range_total",
    "Stored consumer positions no longer in their partition (retention, lost data)",
    ["role", "topic", "partition"],
)
RECORDS_LOST = Counter(
    "qrloop_records_lost_total",
    "Records deleted from a partition before the consumer read them",
    ["role", "topic", "partition"],
)
EVENTS_NOT_WRITTEN = Counter(
    "qrloop_events_not_written_total", "Events whose send to the broker failed", ["role", "topic"]
)
FOLLOWER_ERRORS = Counter(
    "qrloop_announcements_ignored_total",
    "Policy announcements a rewriter's follower could not read or apply",
    ["reason"],
)
STALLED_PARTITIONS = Gauge(
    "qrloop_aggregator_stalled_partitions",
    "Input partitions with records waiting and none handled for streams.stall_after_s (fails /healthz)",
)
REWARD_AVG = Gauge("qrloop_reward_moving_average", "Moving average of the chosen reward", ["arm"])
