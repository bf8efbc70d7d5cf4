"""Leases with fencing epochs in the policy store, on SQLite and PostgreSQL: one holder at a time, takeover
after expiry, and a stale holder's publish refused by the database inside the publish transaction."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from policy_store import Lease, LeaseLostError, Leases, PolicyStore
from policy_store.db import upgrade


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[PolicyStore]:
    upgrade(db_url)
    with PolicyStore(db_url, tmp_path / "blobs") as s:
        yield s


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    path = tmp_path_factory.mktemp("weights")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def test_one_holder_renew_release_and_reacquire(store: PolicyStore) -> None:
    leases = Leases(store)
    a = leases.try_acquire("learner:x", "a", ttl_s=30)
    assert a is not None and a.epoch == 1
    assert leases.try_acquire("learner:x", "b", ttl_s=30) is None, "held and not expired"
    assert leases.current("learner:x") == a
    renewed = leases.renew(a, ttl_s=60)
    assert renewed.epoch == 1 and renewed.expires_at > a.expires_at, "a renewal keeps the epoch"
    again = leases.try_acquire("learner:x", "a", ttl_s=30)
    assert again is not None and again.epoch == 1, "the holder asking again keeps its epoch"
    assert leases.release(again)
    assert leases.current("learner:x") is None
    b = leases.try_acquire("learner:x", "b", ttl_s=30)
    assert b is not None and b.epoch == 2, "a new holder gets a new epoch"
    with pytest.raises(LeaseLostError, match="now held by b"):
        leases.renew(renewed, ttl_s=30)
    assert not leases.release(again), "a stale holder's release changes nothing"
    assert leases.current("learner:x") == b
    assert leases.try_acquire("learner:y", "a", ttl_s=30) is not None, "leases are per name"


def test_takeover_after_expiry_fences_the_stale_publish(store: PolicyStore, weights: Path) -> None:
    leases = Leases(store)
    stale = leases.try_acquire("learner:x", "a", ttl_s=0.3)
    assert stale is not None
    time.sleep(0.5)  # "a" pauses past its expiry (a GC pause, a swap storm) and does not know it
    fresh = leases.try_acquire("learner:x", "b", ttl_s=30)
    assert fresh is not None and fresh.epoch == stale.epoch + 1

    before = store.list()
    with pytest.raises(LeaseLostError, match="of epoch 1 held by a is no longer current"):
        store.publish(weights, base_model="tiny", extra_sql=lambda session, _v: Leases.fence(session, stale))
    assert store.list() == before, "the refused publish left no version behind"
    published = store.publish(
        weights, base_model="tiny", extra_sql=lambda session, _vid: Leases.fence(session, fresh)
    )
    assert [v.id for v in store.list()] == [published.id]
    # Alias moves are fenced the same way: the stale holder cannot point production anywhere.
    with pytest.raises(LeaseLostError):
        store.set_alias("production", published.id, fence=lambda session: Leases.fence(session, stale))
    assert "production" not in store.aliases()
    store.set_alias("production", published.id, fence=lambda session: Leases.fence(session, fresh))
    assert store.resolve("production").id == published.id

    # An expired lease nobody took over is still current: the epoch, not the clock, fences.
    lapsed = leases.try_acquire("learner:z", "c", ttl_s=0.2)
    assert lapsed is not None
    time.sleep(0.3)
    store.publish(weights, base_model="tiny", extra_sql=lambda session, _vid: Leases.fence(session, lapsed))


def test_racing_first_acquirers_get_exactly_one_lease(store: PolicyStore) -> None:
    # Separate stores (connection pools), started together on a name that has no row yet.
    stores = [PolicyStore(store.url, store.blob_dir) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    won: list[Lease | None] = []

    def race(s: PolicyStore, holder: str) -> None:
        barrier.wait()
        won.append(Leases(s).try_acquire("learner:race", holder, ttl_s=30))

    threads = [threading.Thread(target=race, args=(s, f"h{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in stores:
        s.close()
    winners = [w for w in won if w is not None]
    assert len(won) == 4 and len(winners) == 1, won
    assert winners[0].epoch == 1
