"""The served output vocabulary (qrloop.vocabulary): the kept tokens' logits are the policy's own, nothing
else can be sampled, and the rewriter's logged log-probabilities are those of what it sampled from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qrloop.cli.main import catalog_vocabulary_texts
from qrloop.data import load_prepared
from qrloop.models import build_tiny_policy, load_policy, require_policy
from qrloop.prompting import build_prompt
from qrloop.serving import ArmedRewriter, LoadedPolicy, Rewriter, load_version
from qrloop.settings import RewriterSettings, Settings
from qrloop.vocabulary import VocabularyHead, output_vocabulary, restrict_output_vocabulary, stop_ids

CATALOG_TEXTS = ["cordless drill 20v", "angle bracket steel", "outdoor solar lights", "toilet seat white"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("vocab"), require_policy(Settings()), seed=4)


def test_the_vocabulary_holds_each_texts_tokens_both_ways_and_the_special_tokens(tiny: Path) -> None:
    _, tokenizer = load_policy(tiny)
    kept = set(output_vocabulary(tokenizer, ["cordless drill"]))
    assert set(tokenizer("cordless drill", add_special_tokens=False).input_ids) <= kept
    assert set(tokenizer(" cordless drill", add_special_tokens=False).input_ids) <= kept
    assert set(tokenizer.all_special_ids) <= kept
    assert not set(tokenizer(" toilet", add_special_tokens=False).input_ids) <= kept
    assert len(kept) < 100  # a handful of tokens, not the tokenizer's 49,152


def test_kept_tokens_keep_their_logits_and_no_other_token_can_be_written(tiny: Path) -> None:
    full, tokenizer = load_policy(tiny)
    restricted, _ = load_policy(tiny)
    keep = output_vocabulary(tokenizer, CATALOG_TEXTS)
    restrict_output_vocabulary(restricted, keep)
    allowed = torch.tensor(sorted(set(keep) | stop_ids(restricted)))
    inputs = tokenizer([build_prompt(tokenizer, "cordles dril")], return_tensors="pt")
    with torch.no_grad():
        want, got = full(**inputs).logits, restricted(**inputs).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got[..., allowed], want[..., allowed])
    outside = torch.ones(got.shape[-1], dtype=torch.bool)
    outside[allowed] = False
    assert torch.isneginf(got[..., outside]).all()

    assert sampled_tokens(restricted, tokenizer, inputs) <= set(allowed.tolist())
    # The tiny random model, unrestricted, writes tokens from all over its vocabulary under the same seed.
    assert not sampled_tokens(full, tokenizer, inputs) <= set(allowed.tolist())


def sampled_tokens(model: Any, tokenizer: Any, inputs: Any) -> set[int]:
    """Every token of 8 seeded samples of 12 tokens each."""
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=True,
            max_new_tokens=12,
            num_return_sequences=8,
            pad_token_id=tokenizer.pad_token_id,
        )
    return set(out[:, inputs.input_ids.shape[1] :].flatten().tolist())


def test_the_rewriter_serves_a_restricted_policy_with_finite_logged_logprobs(tiny: Path) -> None:
    """The −inf logits outside the vocabulary pass through sampling (temperature, top-p) and the logged
    log-probabilities: each rewrite's is that of the restricted distribution, finite and negative."""
    model, tokenizer = load_policy(tiny)
    restrict_output_vocabulary(model, output_vocabulary(tokenizer, CATALOG_TEXTS))
    rewriter = Rewriter(
        LoadedPolicy(1, model, tokenizer), lambda _text: [], RewriterSettings(max_new_tokens=8)
    )
    torch.manual_seed(1)
    event = rewriter.serve("drill", shopper_id="s", session_id="x")
    assert len(event.rewrites) == 2
    assert all(float("-inf") < rewrite.logprob < 0 for rewrite in event.rewrites)


def test_every_policy_a_restricted_rewriter_serves_is_restricted(tiny: Path) -> None:
    """The first version, each swapped-in one, the canary arm's, and a canary handed on to production."""
    _, tokenizer = load_policy(tiny)
    keep = output_vocabulary(tokenizer, CATALOG_TEXTS)
    first, second, canary = (load_version(tiny, v) for v in (1, 2, 3))
    settings = RewriterSettings(max_new_tokens=8)
    rewriter = Rewriter(first, lambda _text: [], settings, vocabulary=keep)
    rewriter.swap(second)
    armed = ArmedRewriter(rewriter, 0.5)
    armed.set_canary(canary, 0.5)
    armed.swap_production(canary)  # the canary's loaded policy promoted: restricted once, kept as it is
    heads = [p.model.get_output_embeddings() for p in (first, second, canary)]
    assert all(isinstance(head, VocabularyHead) for head in heads)
    assert [head.keep.tolist() for head in heads] == [sorted(set(keep) | stop_ids(first.model))] * 3
    with pytest.raises(ValueError, match="another output vocabulary"):
        restrict_output_vocabulary(canary.model, keep[:5])
    unrestricted = load_version(tiny, 4)
    Rewriter(unrestricted, lambda _text: [], settings)
    assert not isinstance(unrestricted.model.get_output_embeddings(), VocabularyHead)


def test_the_serve_commands_catalog_vocabulary_never_reads_a_held_out_query() -> None:
    settings = Settings()
    dataset = load_prepared(settings)
    texts = set(catalog_vocabulary_texts(settings))
    assert set(dataset.train_queries["query"]) <= texts
    assert set(dataset.products["text"].head(100)) <= texts
    assert not set(dataset.heldout_queries["query"]) & texts


def test_an_empty_or_out_of_range_vocabulary_is_refused(tiny: Path) -> None:
    model, _ = load_policy(tiny)
    head = model.get_output_embeddings()
    with pytest.raises(ValueError, match="at least one"):
        VocabularyHead(head, [])
    with pytest.raises(ValueError, match="must lie in"):
        VocabularyHead(head, [head.weight.shape[0]])
