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
from qrloop import data, models
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
    check_data,
]


def run_checks(settings: Settings) -> list[CheckResult]:
    return [check(settings) for check in CHECKS]
