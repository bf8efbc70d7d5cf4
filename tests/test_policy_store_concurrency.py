"""Two real processes (spawn) writing to one policy store at once, on SQLite and on PostgreSQL.

The workers live at module level and import only the store (no torch), so spawned children start fast.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from policy_store import PolicyStore
from policy_store.db import upgrade

PUBLISHES_PER_WORKER = 6
MOVES_PER_WORKER = 15
TIMEOUT_S = 60


def _publish_worker(url: str, blob_dir: str, src: str, name: str, barrier: Barrier, out: Any) -> None:
    with PolicyStore(url, Path(blob_dir)) as store:
        barrier.wait()
        ids = [
            store.publish(Path(src), base_model="tiny", train_steps=i, tags={"worker": name}).id
            for i in range(PUBLISHES_PER_WORKER)
        ]
    out.put((name, ids))


def _alias_worker(url: str, blob_dir: str, version: int, name: str, barrier: Barrier, out: Any) -> None:
    with PolicyStore(url, Path(blob_dir)) as store:
        barrier.wait()
        for i in range(MOVES_PER_WORKER):
            store.set_alias("production", version, reason=f"{name} move {i}", actor=name)
    out.put((name, MOVES_PER_WORKER))


def _run_pair(target: Any, args_a: tuple[Any, ...], args_b: tuple[Any, ...]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for args in (args_a, args_b)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=TIMEOUT_S) for _ in procs)
    for p in procs:
        p.join(TIMEOUT_S)
        assert p.exitcode == 0
    return results


def _weights_dir(path: Path, seed: int) -> Path:
    # Imported here, not at module level: spawned workers import this module and need no torch.
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    generator = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(256, 256, generator=generator)}, path / "model.safetensors")
    return path


def test_concurrent_publishers_get_distinct_ordered_ids(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    blob_dir = tmp_path / "blobs"
    a, b = _weights_dir(tmp_path / "a", 1), _weights_dir(tmp_path / "b", 2)
    results = _run_pair(
        _publish_worker, (db_url, str(blob_dir), str(a), "a"), (db_url, str(blob_dir), str(b), "b")
    )

    ids_a, ids_b = results["a"], results["b"]
    assert ids_a == sorted(ids_a) and ids_b == sorted(ids_b)  # each publisher sees its ids grow
    assert len(set(ids_a) | set(ids_b)) == 2 * PUBLISHES_PER_WORKER  # and no id is handed out twice
    with PolicyStore(db_url, blob_dir) as store:
        versions = store.list(newest_first=False)
        assert [v.id for v in versions] == sorted(ids_a + ids_b)
        by_worker = {v.id: v.tags["worker"] for v in versions}
        assert {by_worker[i] for i in ids_a} == {"a"} and {by_worker[i] for i in ids_b} == {"b"}
        assert len(store.audit(action="publish", limit=None)) == 2 * PUBLISHES_PER_WORKER
        assert len(list(store.blobs.iter_blobs())) == 2  # each worker's content stored once


def test_concurrent_set_alias_serialises_and_audits_every_move(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    blob_dir = tmp_path / "blobs"
    with PolicyStore(db_url, blob_dir) as store:
        v1 = store.publish(_weights_dir(tmp_path / "a", 1), base_model="tiny")
        v2 = store.publish(_weights_dir(tmp_path / "b", 2), base_model="tiny")

    # The alias does not exist yet: the two workers also race to create it.
    _run_pair(_alias_worker, (db_url, str(blob_dir), v1.id, "a"), (db_url, str(blob_dir), v2.id, "b"))

    with PolicyStore(db_url, blob_dir) as store:
        moves = list(reversed(store.history("production")))  # oldest first
        assert len(moves) == 2 * MOVES_PER_WORKER
        assert {m.actor for m in moves} == {"a", "b"}
        # Serialised: every move saw the result of the one before it (no lost update)...
        assert moves[0].from_version is None
        for before, after in itertools.pairwise(moves):
            assert after.from_version == before.to_version
        # ...one final holder, the last move's target, and every real change counted once.
        assert store.resolve("production").id == moves[-1].to_version
        changes = sum(1 for m in moves[1:] if m.from_version != m.to_version)
        assert store.aliases()["production"].generation == 1 + changes
