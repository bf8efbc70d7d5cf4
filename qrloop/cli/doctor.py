"""`qrloop doctor`: every real part checked, each failure with the exact command that fixes it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from kafka import KafkaAdminClient
from sqlalchemy.engine import make_url

from policy_store.db import alembic_config, make_engine
from qrloop import catalog_embeddings, data, models
from qrloop.settings import Settings


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_kafka(settings: Settings) -> CheckResult:
    servers = settings.kafka.bootstrap_servers
    jars = settings.kafka.home / settings.kafka.version / "libs" / ".complete"  # type: ignore[operator]
    try:
        admin = KafkaAdminClient(bootstrap_servers=servers, request_timeout_ms=3000)
        brokers = admin.describe_cluster()["brokers"]
        admin.close()
        return CheckResult("kafka", True, f"{len(brokers)} broker(s) at {servers}")
    except Exception as exc:
        fix = (
            "scripts/kafka.sh start"
            if jars.exists()
            else "scripts/kafka.sh install && scripts/kafka.sh start"
        )
        return CheckResult("kafka", False, f"no broker at {servers} ({type(exc).__name__})", fix)


def check_database(settings: Settings) -> CheckResult:
    url = settings.db_url
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        engine = make_engine(url)
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        engine.dispose()
    except Exception as exc:
        fix = "scripts/postgres.sh start" if url.startswith("postgresql") else "check QRLOOP_DATABASE_URL"
        return CheckResult("database", False, f"cannot connect to {shown} ({type(exc).__name__})", fix)
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if current != head:
        return CheckResult(
            "database", False, f"{shown} at revision {current}, head is {head}", "qrloop db upgrade"
        )
    return CheckResult("database", True, f"{shown} at head ({head})")


def check_policy_model(settings: Settings) -> CheckResult:
    try:
        models.find_policy_gguf()
    except models.ModelMissingError as exc:
        return CheckResult("policy model", False, str(exc), models.POLICY_PIP)
    folder = models.policy_dir(settings)
    if not models.is_policy_prepared(settings):
        return CheckResult("policy model", False, f"not converted into {folder}", "qrloop models prepare")
    meta = json.loads((folder / models.PREPARED_MARKER).read_text())
    return CheckResult("policy model", True, f"{folder} ({meta['parameters']:,} parameters)")


def check_encoder(settings: Settings) -> CheckResult:
    try:
        return CheckResult("relevance encoder", True, str(models.encoder_dir(settings)))
    except models.ModelMissingError as exc:
        return CheckResult("relevance encoder", False, str(exc), models.ENCODER_PIP)


def check_relevance_model(settings: Settings) -> CheckResult:
    from qrloop import relevance

    folder = relevance.relevance_dir(settings)
    report = relevance.read_report(folder)
    problem = relevance.report_problem(report, settings)
    if report is not None and problem is None:
        spearman = report.get("heldout", {}).get("spearman")
        quality = f", held-out Spearman {spearman:.3f}" if isinstance(spearman, float) else ""
        return CheckResult("relevance model M1", True, f"{report.get('kind')} in {folder}{quality}")
    return CheckResult(
        "relevance model M1",
        False,
        f"{problem} (the untrained cosine fallback will be used)",
        relevance.HEAD_COMMAND,
    )


def check_catalog_embeddings(settings: Settings) -> CheckResult:
    """Optional (set-up does not build them): present and recorded for this data set and M1's encoder files?
    The full check (this catalog's texts, a few rows re-encoded bit for bit) runs when M1 loads."""
    from qrloop import relevance

    folder = catalog_embeddings.embeddings_dir(settings)
    meta = catalog_embeddings.read_meta(folder)
    name, command = "catalog embeddings", catalog_embeddings.EMBED_COMMAND
    if meta is None:
        return CheckResult(
            name,
            True,
            f"not built (optional: M1 encodes each product on first sight; `{command}` for "
            "aggregator throughput)",
        )
    m1_folder, kind = relevance.configured_kind(settings)
    source = relevance.embedding_source(m1_folder, kind, settings)
    problem = None
    if meta.get("dataset") != data.dataset_name(settings):
        problem = f"built for data set {meta.get('dataset')!r}, not {data.dataset_name(settings)!r}"
    elif source is None:
        problem = f"M1 ({kind}) embeds no product alone: they are not used"
    elif meta.get("encoder", {}).get("files_sha256") != catalog_embeddings.files_digest(source):
        problem = f"built with another encoder than M1's ({kind}, {source})"
    elif meta.get("encoder", {}).get("encoding") != catalog_embeddings.ENCODING:
        problem = f"its texts were encoded otherwise than M1 encodes them now ({catalog_embeddings.ENCODING})"
    if problem is not None:
        return CheckResult(
            name, False, f"{folder}: {problem}; ignored (products encoded on the fly)", command
        )
    return CheckResult(name, True, f"{int(meta['rows']):,} product texts for the {kind} encoder in {folder}")


def check_data(settings: Settings) -> CheckResult:
    source = data.source_folder(settings)
    if not source.is_dir():
        return CheckResult(
            "data", False, f"no data folder at {source}", "export QRLOOP_DATA_DIR=/path/to/shared/data"
        )
    meta_path = settings.prepared_data_dir / "meta.json"
    if not meta_path.is_file():
        return CheckResult("data", False, f"{source} not prepared", "qrloop data prepare")
    meta = json.loads(meta_path.read_text())
    return CheckResult(
        "data", True, f"{meta['dataset']}: {meta['products']:,} products, {meta['queries']:,} queries"
    )


CHECKS: list[Callable[[Settings], CheckResult]] = [
    check_kafka,
    check_database,
    check_policy_model,
    check_encoder,
    check_relevance_model,
    check_catalog_embeddings,
    check_data,
]


def run_checks(settings: Settings) -> list[CheckResult]:
    return [check(settings) for check in CHECKS]
