"""The offline phase: Q2Q graph, reverse KL, the student cut, SFT and distillation on tiny real models.

Tiny = ``build_tiny_policy``: a random 2-layer Llama with the real SmolLM2 tokenizer and chat template, so the
prompt, tokenization, TRL and generation paths are the real ones at a fraction of the cost.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from learner.offline import q2q
from learner.offline.build import StudentConfig
from learner.offline.distill import (
    choose_block,
    compare_with_gkd,
    contiguous_cuts,
    distill,
    forward_kl,
    kept_layers,
    make_student,
    mean_reverse_kl,
    reverse_kl,
    teacher_pairs,
    token_ids_match,
)
from learner.offline.q2q import QueryPair
from learner.offline.sft import collate, completion_loss, prompt_completion_rows, train_sft
from qrloop.data import is_heldout
from qrloop.models import build_tiny_policy, load_policy, require_policy
from qrloop.prompting import RESULT_WORDS, end_of_turn, hint_words
from qrloop.runs import open_store
from qrloop.settings import Settings

PAIRS = [
    QueryPair("drill bit set", "drill bits", "graph", 1, "train"),
    QueryPair("paint roler", "paint roller", "spelling", 0, "train"),
    QueryPair("pvc compression coupling", "compression coupling", "graph", 2, "train"),
    QueryPair("toungh groove", "tongue and groove", "spelling", 0, "train"),
]


def _query(base: str, heldout: bool) -> str:
    """A query string on the wanted side of the held-out split (the split hashes the text)."""
    for i in itertools.count():
        text = f"{base} {i}"
        if is_heldout(text) == heldout:
            return text
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny"), require_policy(Settings()), seed=0)


# ------------------------------------------------------------------------------------------------ Q2Q graph


@pytest.fixture(scope="module")
def triples() -> tuple[pd.DataFrame, dict[str, str]]:
    q = {
        "cd": _query("cordless drill", heldout=False),
        "dc": _query("drill cordless", heldout=False),
        "pd": _query("power drill", heldout=False),
        "hm": _query("hammer", heldout=False),
        "held": _query("drill driver", heldout=True),
    }
    rows = [
        ("cd", "p1", 3.0), ("cd", "p2", 3.0), ("cd", "p3", 2.33),
        ("dc", "p1", 3.0), ("dc", "p2", 2.67), ("dc", "p3", 3.0),
        ("pd", "p2", 3.0), ("pd", "p4", 1.0),
        ("hm", "p4", 3.0),
        ("held", "p1", 3.0), ("held", "p2", 3.0),
    ]  # fmt: skip
    frame = pd.DataFrame(
        {
            "query": [q[k] for k, _, _ in rows],
            "product_id": [p for _, p, _ in rows],
            "grade": [g for _, _, g in rows],
            "relevance": [(g - 1.0) / 2.0 for _, _, g in rows],  # HD's mapping to [0, 1]
        }
    )
    return frame, q


def _pairs(frame: pd.DataFrame) -> set[tuple[str, str, int]]:
    return set(zip(frame["query_a"], frame["query_b"], frame["shared"], strict=True))


def test_graph_pairs_respect_k_threshold_and_heldout(triples: tuple[pd.DataFrame, dict[str, str]]) -> None:
    frame, q = triples
    cd, dc, pd_, held = q["cd"], q["dc"], q["pd"], q["held"]
    edges = q2q.relevant_edges(frame, min_grade=2.67)
    found = q2q.shared_product_pairs(edges, k=1)
    # sorted by text: "cordless…" < "drill cordless…" < "drill driver…" < "power…"
    assert _pairs(found) == {
        (cd, dc, 2),
        (cd, pd_, 1),
        (dc, pd_, 1),
        (cd, held, 2),
        (dc, held, 2),
        (held, pd_, 1),
    }
    assert _pairs(q2q.drop_heldout(found)) == {(cd, dc, 2), (cd, pd_, 1), (dc, pd_, 1)}
    assert _pairs(q2q.drop_heldout(q2q.shared_product_pairs(edges, k=2))) == {(cd, dc, 2)}
    # a stricter grade: dc's p2 (2.67) drops out, so cd/dc share only p1 and dc/pd nothing
    strict = q2q.drop_heldout(q2q.shared_product_pairs(q2q.relevant_edges(frame, min_grade=3.0), k=1))
    assert _pairs(strict) == {(cd, dc, 1), (cd, pd_, 1)}
    # the [0, 1] rule: relevance >= 0.6 is grade >= 2.2, which lets cd's p3 (2.33) in
    loose = q2q.drop_heldout(q2q.shared_product_pairs(q2q.relevant_edges(frame, min_relevance=0.6), k=1))
    assert _pairs(loose) == {(cd, dc, 3), (cd, pd_, 1), (dc, pd_, 1)}
    # the hammer shares only an irrelevant (grade 1) product with the power drill: never a pair
    assert not any(q["hm"] in pair for pair in _pairs(found))


def test_directed_pairs_split_by_unordered_pair_and_keep_heldout_out(
    triples: tuple[pd.DataFrame, dict[str, str]],
) -> None:
    frame, q = triples
    graph = q2q.drop_heldout(q2q.shared_product_pairs(q2q.relevant_edges(frame, min_grade=2.67), k=1))
    spelling = q2q.drop_identical(
        q2q.drop_heldout(
            pd.DataFrame(
                {
                    "query_a": ["cordles drill", q["held"], "Power  Drill"],
                    "query_b": [q["cd"], "drill driver", "power drill"],
                }
            )
        )
    )
    assert list(spelling["query_a"]) == ["cordles drill"]  # held-out and identical spelling pairs are gone
    pairs = q2q.directed_pairs(graph, spelling, eval_fraction=0.5)
    assert len(pairs) == 2 * 3 + 1
    assert all(q["held"] not in (p.source, p.target) for p in pairs)
    by_direction = {(p.source, p.target): p for p in pairs}
    for p in pairs:
        if p.origin == "graph":
            assert by_direction[(p.target, p.source)].split == p.split  # both directions on one side
    assert ("cordles drill", q["cd"]) in by_direction and (q["cd"], "cordles drill") not in by_direction
    assert q2q.pair_split("a b", "c") == q2q.pair_split("C", " A  b")


def test_title_pairs_name_the_judged_products_a_query_misses_and_only_those(
    triples: tuple[pd.DataFrame, dict[str, str]],
) -> None:
    frame, q = triples
    titles = {
        "p1": "DEWALT 20-Volt MAX Lithium-Ion Cordless Drill Driver Kit",
        "p2": "Ryobi ONE+ 18V Drill",
        "p3": "Milwaukee M12 Drill",
        "p4": "Estwing 16 oz. Hammer",
    }
    searched: list[str] = []
    shows = {q["cd"]: ["p1", "p9"], q["hm"]: ["p4"]}  # dc and pd show nothing they are judged relevant to

    def search(query: str, k: int) -> list[str]:
        searched.append(query)
        return shows.get(query, [])[:k]

    edges = q2q.relevant_edges(frame, min_grade=2.67)  # cd: p1 p2; dc: p1 p2 p3; pd: p2; hm: p4
    pairs = q2q.title_pairs(edges, titles, search, words=6, per_query=2)

    assert q["held"] not in searched, "a held-out query is never searched, let alone trained on"
    assert set(zip(pairs["query_a"], pairs["query_b"], strict=True)) == {
        (q["cd"], "ryobi one+ 18v drill"),  # p1 is already in cd's results: nothing to add
        (q["dc"], "dewalt 20-volt max lithium-ion cordless drill"),  # six words, lower-cased
        (q["dc"], "ryobi one+ 18v drill"),  # per_query=2: p3 is left out
        (q["pd"], "ryobi one+ 18v drill"),
    }  # hm's only judged product is in its results: no pair
    no_graph = pd.DataFrame(columns=["query_a", "query_b", "shared"])
    directed = q2q.directed_pairs(no_graph, no_graph, 0.5, titles=pairs)
    assert {(p.source, p.target, p.origin) for p in directed} == {
        (a, b, "title") for a, b in zip(pairs["query_a"], pairs["query_b"], strict=True)
    }, "title pairs go one way only, towards the title"


def test_expansion_pairs_add_the_words_that_find_the_judged_products_a_query_misses() -> None:
    drill, hammer, held = _query("drill", False), _query("hammer", False), _query("drill", True)
    edges = pd.DataFrame(
        {
            "query": [drill, drill, drill, hammer, held],
            "product_id": ["p1", "p2", "p5", "p3", "p1"],
        }
    )
    titles = {
        "p1": "Ryobi Cordless Drill Kit",
        "p2": "DEWALT Cordless Drill",
        "p3": "Hammer Drill Bits",
        "p4": "Drill Press",
        "p5": "Ryobi Drill Case",
    }
    results = {
        drill: ["p3", "p4", "p1", "p2", "p5"],  # shows p3 and p4 in its top 2; p1, p2 and p5 are judged
        hammer: ["p3", "p4"],  # shows its only judged product: nothing to add
        f"{drill} cordless": ["p1", "p2"],  # adds two judged products
        f"{drill} ryobi": ["p1", "p4"],  # adds one
        f"{drill} kit": ["p5", "p3"],  # adds one, but "ryobi" comes first among the ties
        f"{drill} hammer": ["p3", "p4"],  # adds nothing
    }
    searched: list[str] = []

    def search(query: str, k: int) -> list[str]:
        searched.append(query)
        return results.get(query, [])[:k]

    pairs = q2q.expansion_pairs(edges, titles, search, depth=5, terms=6, per_query=2, top_k=2)

    assert list(zip(pairs["query_a"], pairs["query_b"], strict=True)) == [
        (drill, f"{drill} cordless"),
        (drill, f"{drill} ryobi"),
    ]
    assert held not in searched and not any(q.startswith(f"{hammer} ") for q in searched)
    expansions = {q for q in searched if q.startswith(f"{drill} ")}
    assert expansions == {f"{drill} {w}" for w in ("cordless", "ryobi", "hammer", "bits", "press", "kit")}
    no_graph = pd.DataFrame(columns=["query_a", "query_b", "shared"])
    directed = q2q.directed_pairs(no_graph, no_graph, 0.5, expansions=pairs)
    assert {(p.source, p.target, p.origin) for p in directed} == {
        (drill, f"{drill} cordless", "expansion"),
        (drill, f"{drill} ryobi", "expansion"),
    }, "expansion pairs go one way only, towards the expansion"


def test_a_misspelled_query_is_expanded_as_the_catalog_spells_it() -> None:
    typo = _query("drils", False)
    fixed = typo.replace("drils", "drill")
    edges = pd.DataFrame({"query": [typo, typo], "product_id": ["p1", "p2"]})
    titles = {"p1": "Ryobi Cordless Drill Kit", "p2": "DEWALT Cordless Drill", "p4": "Drill Press"}
    results = {
        typo: ["p4"],  # the typo finds what its other characters do: neither judged product
        fixed: [
            "p4",
            "p1",
            "p2",
        ],  # the corrected query's top 1 misses them too; its deeper results hold them
        f"{fixed} cordless": ["p1", "p2"],
        f"{fixed} ryobi": ["p1"],
    }
    searched: list[str] = []

    def search(query: str, k: int) -> list[str]:
        searched.append(query)
        return results.get(query, [])[:k]

    def correct(query: str) -> str:
        return query.replace("drils", "drill")

    pairs = q2q.expansion_pairs(edges, titles, search, depth=3, terms=3, top_k=1, correct=correct)
    # the targets start from the correction; what they add is counted against the typed query's top 1
    assert list(zip(pairs["query_a"], pairs["query_b"], strict=True)) == [
        (typo, f"{fixed} cordless"),
        (typo, f"{fixed} ryobi"),
    ]
    assert searched[:2] == [fixed, typo]
    unspelled = q2q.expansion_pairs(edges, titles, search, depth=3, terms=3, top_k=1)
    assert unspelled.empty  # the typo's own results have no word that finds a judged product


def test_relevance_verifier_checks_the_partners_other_products() -> None:
    products = {"drill": ["cordless drill kit", "drill bits"], "driver": ["drill bits", "impact driver"]}

    def overlap(query: str, texts: Sequence[str]) -> np.ndarray:  # a plain scorer: 1 if a word is shared
        return np.array([float(bool(set(query.split()) & set(t.split()))) for t in texts])

    verifier = q2q.relevance_verifier(overlap, products, threshold=0.5)
    assert not verifier("drill", "driver")  # "impact driver" shares no word with "drill"
    equivalent = {"drill": ["drill driver kit", "drill bits"], "driver": ["drill bits", "drill driver"]}
    assert q2q.relevance_verifier(overlap, equivalent, threshold=0.5)("drill", "driver")


# ---------------------------------------------------------------------------------------------- reverse KL


def test_reverse_kl_matches_hand_computation_and_is_not_symmetric() -> None:
    p_s = torch.tensor([0.5, 0.25, 0.25])
    p_t = torch.tensor([0.25, 0.5, 0.25])
    s_logits, t_logits = p_s.log().view(1, 1, 3), p_t.log().view(1, 1, 3)
    mask = torch.ones(1, 1, dtype=torch.bool)
    by_hand = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)
    assert float(reverse_kl(s_logits, t_logits, mask)) == pytest.approx(by_hand, abs=1e-6)
    assert float(reverse_kl(s_logits, s_logits, mask)) == pytest.approx(0.0, abs=1e-7)
    # asymmetric pair: S puts mass where T has little
    q_s, q_t = torch.tensor([0.9, 0.05, 0.05]), torch.tensor([0.4, 0.3, 0.3])
    rev = float(reverse_kl(q_s.log().view(1, 1, 3), q_t.log().view(1, 1, 3), mask))
    fwd = float(forward_kl(q_s.log().view(1, 1, 3), q_t.log().view(1, 1, 3), mask))
    by_hand = 0.9 * math.log(0.9 / 0.4) + 2 * 0.05 * math.log(0.05 / 0.3)
    assert rev == pytest.approx(by_hand, abs=1e-6)
    assert abs(rev - fwd) > 0.05


def test_reverse_kl_averages_over_masked_tokens_only() -> None:
    s = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]]])
    t = torch.tensor([[[0.0, 2.0], [0.0, 0.0], [-5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    per_token = [float(reverse_kl(s[:, i : i + 1], t[:, i : i + 1], mask[:, :1])) for i in range(2)]
    assert float(reverse_kl(s, t, mask)) == pytest.approx(sum(per_token) / 2, abs=1e-6)


# ------------------------------------------------------------------------------------------------- student


def test_student_keeps_every_other_layer_exactly(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny))
    config.num_hidden_layers = 4
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(tmp_path / "teacher")

    student_dir = make_student(tmp_path / "teacher", tmp_path / "student")
    student, _ = load_policy(student_dir)
    assert kept_layers(4) == [0, 2] and student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2]):
        for name, value in s_state.items():
            if name.startswith(f"model.layers.{new}."):
                source = name.replace(f"model.layers.{new}.", f"model.layers.{old}.", 1)
                assert torch.equal(value, t_state[source]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[name], t_state[name])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]  # KV cache indices
    texts = ["cordless drill 20v", "toungh groove <|im_end|>", "Ünïcode ½ inch"]
    assert token_ids_match(tiny, student_dir, texts)  # the real SmolLM2 tokenizer's ids
    student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)  # the cache works


def test_contiguous_cuts_drop_one_block_and_keep_the_first_and_last_layer() -> None:
    assert contiguous_cuts(6, 4) == {1: [0, 3, 4, 5], 2: [0, 1, 4, 5], 3: [0, 1, 2, 5]}
    assert contiguous_cuts(30, 15)[7] == [*range(7), *range(22, 30)]
    with pytest.raises(ValueError, match="2 to 5 layers"):
        contiguous_cuts(6, 6)


def test_choose_block_drops_the_layers_that_change_nothing(tiny: Path, tmp_path: Path) -> None:
    """Layers 3 and 4 of a 6-layer teacher write nothing to the residual stream (zero output projections):
    the 4-layer cut that drops exactly them predicts as the teacher does, and is the one chosen."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny))
    config.num_hidden_layers = 6
    torch.manual_seed(2)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for i in (3, 4):
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(tmp_path / "teacher")

    choice = choose_block(tmp_path / "teacher", PAIRS, depth=4)
    assert choice.kept == [0, 1, 2, 5]
    assert choice.nll_by_first_dropped[3] == pytest.approx(choice.teacher_nll, abs=1e-5)
    assert min(choice.nll_by_first_dropped[1], choice.nll_by_first_dropped[2]) > choice.teacher_nll + 1e-3
    student = make_student(tmp_path / "teacher", tmp_path / "student", keep=choice.kept)
    assert load_policy(student)[0].config.num_hidden_layers == 4


def test_teacher_pairs_are_the_teachers_seeded_samples_of_each_query(tiny: Path) -> None:
    queries = ["drill bit set", "paint roler"]
    pairs = teacher_pairs(tiny, queries, n=3, seed=5)
    assert [p.source for p in pairs] == [queries[0]] * 3 + [queries[1]] * 3
    assert all(p.origin == "teacher" and p.split == "train" and p.target for p in pairs)
    assert len({p.target for p in pairs}) > 1, "sampled, not greedy"
    assert teacher_pairs(tiny, queries, n=3, seed=5) == pairs, "seeded: the same samples again"


# ------------------------------------------------------------------------------------- SFT and distillation


def test_sft_lowers_the_loss_on_its_training_pairs(tiny: Path, tmp_path: Path) -> None:
    model, tokenizer = load_policy(tiny)
    eos = end_of_turn(tokenizer, model.generation_config)
    assert eos == "<|im_end|>"  # what generate stops on, not the GGUF tokenizer's "<|im_start|>"
    batch = collate(tokenizer, prompt_completion_rows(PAIRS, tokenizer, eos))
    assert batch["completion_mask"].sum(1).tolist() == [
        len(tokenizer(p.target + eos)["input_ids"]) for p in PAIRS
    ]  # exactly target + end of turn is learned
    before = completion_loss(model, tokenizer, PAIRS, eos)
    result = train_sft(tiny, PAIRS, tmp_path / "sft", max_steps=4, batch_size=4, learning_rate=2e-3)
    trained, trained_tok = load_policy(tmp_path / "sft")
    after = completion_loss(trained, trained_tok, PAIRS, eos)
    assert result.steps == 4 and after < before - 0.1, (before, after)
    assert result.losses[0] == pytest.approx(before, rel=1e-3)  # TRL's masked loss is ours


def test_distillation_lowers_reverse_kl_and_gkd_beta1_matches(tiny: Path, tmp_path: Path) -> None:
    other = build_tiny_policy(tmp_path / "other", tiny, seed=1)
    student_dir = make_student(other, tmp_path / "student")  # 1 layer, different weights from the teacher
    teacher, tokenizer = load_policy(tiny)
    batch = collate(
        tokenizer, prompt_completion_rows(PAIRS, tokenizer, end_of_turn(tokenizer, teacher.generation_config))
    )
    before = mean_reverse_kl(teacher, load_policy(student_dir)[0], batch)
    result = distill(
        tiny, student_dir, PAIRS, tmp_path / "distilled", steps=4, batch_size=4, learning_rate=3e-3
    )
    after = mean_reverse_kl(teacher, load_policy(tmp_path / "distilled")[0], batch)
    assert result.steps == 4 and after < 0.7 * before, (before, after)

    gkd = compare_with_gkd(tiny, student_dir, PAIRS)
    assert gkd["ours"] > 0 and gkd["abs_diff"] < 1e-6, gkd


# ------------------------------------------------------------------------------------------------ publishing


def _table2(student_xentropy: float, teacher_xentropy: float) -> dict[str, dict[str, float]]:
    row = {"exact_match": 0.0, "rouge_l": 0.0, "mean_length": 3.0, "n": 4.0}
    return {"T→S/P": {**row, "xentropy": student_xentropy}, "T/P": {**row, "xentropy": teacher_xentropy}}


def test_the_best_rule_publishes_the_model_with_the_lower_evaluation_cross_entropy() -> None:
    from learner.offline.build import choose_published

    assert choose_published(_table2(2.0, 3.0), "best") == "T→S/P"
    assert choose_published(_table2(6.4, 2.9), "best") == "T/P"
    assert choose_published(_table2(3.0, 3.0), "best") == "T→S/P", "a tie goes to the smaller model"
    assert choose_published(_table2(6.4, 2.9), "student") == "T→S/P"
    with pytest.raises(ValueError, match="publish_model"):
        choose_published(_table2(1.0, 2.0), "largest")


def test_publish_existing_publishes_the_chosen_directory_and_moves_the_alias(
    tiny: Path, tmp_path: Path, sqlite_url: str
) -> None:
    import json
    import shutil
    from dataclasses import asdict

    from learner.offline.build import MiniELMReport, offline_dir, publish_existing
    from policy_store import db

    settings = Settings(cache_dir=tmp_path, database_url=sqlite_url, blob_dir=tmp_path / "blobs")
    out = offline_dir(settings)
    shutil.copytree(tiny, out / "teacher")
    make_student(tiny, out / "minielm")  # 1 layer: distinguishable from the 2-layer teacher
    report = MiniELMReport(config={"student_from": "teacher"}, q2q={"dataset": "homedepot", "train": 4})
    report.table2, report.training = _table2(6.4, 2.9), {"S": {"steps": 3}, "T→S": {"steps": 5}}
    report.out_dir = str(out)
    (out / "report.json").write_text(json.dumps(asdict(report)))
    db.upgrade(sqlite_url)

    published = publish_existing(settings, "best", alias="production")

    store = open_store(settings)
    try:
        version = store.resolve("production")
        assert version.id == published.version and published.published == "T/P"
        assert version.tags["published"] == "T/P" and version.tags["stage"] == "offline"
        assert version.tags["published_layers"] == 2 and version.tags["student_layers"] == 1
        assert "teacher is published" in store.history("production")[0].reason
    finally:
        store.close()
    assert json.loads((out / "report.json").read_text())["published"] == "T/P"


def _offline_settings(tmp_path: Path, sqlite_url: str) -> Settings:
    """Settings whose cache, store and blobs are ``tmp_path``'s, over the prepared data set (read only), with
    the store migrated."""
    from policy_store import db

    base = Settings()
    settings = base.model_copy(
        update={"cache_dir": tmp_path, "database_url": sqlite_url, "blob_dir": tmp_path / "blobs"}
    )
    (tmp_path / "data").symlink_to(base.cache_dir / "data")
    db.upgrade(sqlite_url)
    return settings


def test_warm_start_sfts_on_unverified_pairs_and_publishes_production(
    tiny: Path, tmp_path: Path, sqlite_url: str
) -> None:
    from learner.offline.build import WARM_START_TAG, warm_start
    from qrloop.cli.demo import offline_policy_version

    settings = _offline_settings(tmp_path, sqlite_url)
    assert offline_policy_version(settings) is None, "an empty store has no offline policy"

    # A search engine that shows nothing: every judged-relevant product of a training query is "missed".
    version_id = warm_start(settings, steps=2, batch_size=2, base_dir=tiny, search=lambda _query, _k: [])

    assert offline_policy_version(settings) == version_id
    crowdflower = settings.model_copy(update={"dataset": "crowdflower"})
    assert offline_policy_version(crowdflower) is None, "the Home Depot warm start is not for CrowdFlower"
    store = open_store(settings)
    try:
        version = store.get(version_id)
        assert version.tags["published"] == WARM_START_TAG and version.train_steps == 2
        assert version.tags["dataset"] == "homedepot"
        assert version.tags["q2q_train_pairs"] > 1000, "graph and spelling pairs of the real data set"
        assert version.tags["title_pairs"] is True
        origins = {
            p.origin
            for p in q2q.read_pairs(tmp_path / "offline" / "warm-start" / "homedepot" / "q2q" / "train.jsonl")
        }
        assert origins == {"graph", "spelling", "title"}
        # Another catalog's offline policy takes 'production': each data set still finds its own.
        other = store.publish(tiny, base_model="tiny", tags={"stage": "offline", "dataset": "crowdflower"})
        store.set_alias("production", other.id, reason="test", actor="test")
    finally:
        store.close()
    assert offline_policy_version(crowdflower) == other.id
    assert offline_policy_version(settings) == version_id, "the newest Home Depot offline version"
    pairs = q2q.read_pairs(tmp_path / "offline" / "warm-start" / "homedepot" / "q2q" / "train.jsonl")
    assert pairs and not any(is_heldout(p.source) or is_heldout(p.target) for p in pairs)


def test_a_hinted_warm_start_trains_on_its_queries_results_words_and_says_so(
    tiny: Path, tmp_path: Path, sqlite_url: str
) -> None:
    from learner.offline.build import hinted_pairs, warm_start, warm_start_student
    from qrloop.models import load_stored_policy

    asked: list[str] = []

    def hints(query: str) -> list[str]:
        asked.append(query)
        return [f"w{len(query)}"]

    pairs = [
        q2q.QueryPair("drill", "cordless drill", "graph", 2, "train"),
        q2q.QueryPair("drill", "drill bit", "title", 1, "train"),
    ]
    hinted = hinted_pairs(pairs, hints)
    assert [p.source for p in hinted] == ["drill\nWords in its results: w5"] * 2
    assert [(p.target, p.origin) for p in hinted] == [(p.target, p.origin) for p in pairs]
    assert asked == ["drill"], "one search per distinct query"

    settings = _offline_settings(tmp_path, sqlite_url)
    asked.clear()
    version_id = warm_start(settings, steps=1, batch_size=2, base_dir=tiny, hints=hints)
    training = q2q.read_pairs(tmp_path / "offline" / "warm-start" / "homedepot" / "q2q" / "train.jsonl")
    assert len(asked) == len({p.source for p in training}), "one search for words per training query"
    store = open_store(settings)
    try:
        version = store.get(version_id)
        assert version.tags["prompt"] == "hinted"
        assert version.tags["catalog_spelling"] is False, "no speller was given: the tag says so"
        model, _tokenizer = load_stored_policy(store, version)
    finally:
        store.close()
    assert hint_words(model) == RESULT_WORDS, "the published weights say which prompt they were trained on"
    with pytest.raises(ValueError, match="hinted"):
        warm_start_student(settings)


def _five_layers(tiny: Path, tmp_path: Path) -> Path:
    """A random five-layer model of the tiny policy's shape: deep enough for a three-layer student."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny))
    config.num_hidden_layers = 5
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "five")
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(tmp_path / "five")
    return tmp_path / "five"


def _small_student() -> StudentConfig:
    return StudentConfig(
        layers=3,
        steps=2,
        distill_steps=1,
        teacher_queries=3,
        batch_size=2,
        calibration_pairs=4,
        eval_pairs=4,
        serving_queries=2,
    )


def test_the_warm_starts_student_is_cut_trained_measured_and_published_as_production(
    tiny: Path, tmp_path: Path, sqlite_url: str
) -> None:
    from learner.offline.build import STUDENT_TAG, warm_start, warm_start_student

    settings = _offline_settings(tmp_path, sqlite_url)
    with pytest.raises(FileNotFoundError, match="qrloop offline warm-start"):
        warm_start_student(settings)
    teacher_version = warm_start(settings, steps=1, batch_size=2, base_dir=_five_layers(tiny, tmp_path))
    with pytest.raises(ValueError, match="plain: its student takes no hints"):
        warm_start_student(settings, _small_student(), hints=lambda _query: ["drill"])

    report = warm_start_student(settings, _small_student())

    assert sorted(report.cut_xentropy) == [1, 2], "both 3-layer cuts that keep the first and last layer"
    cheapest = min(report.cut_xentropy, key=lambda first: report.cut_xentropy[first])
    assert report.kept_layers == contiguous_cuts(5, 3)[cheapest]
    assert set(report.table2) == {"T/P", "S/cut", "S/P", "T→S/P"}
    assert report.training["S"]["steps"] == 2 and report.training["T→S"]["steps"] == 1
    assert report.serving_ratio() > 0
    store = open_store(settings)
    try:
        production = store.resolve("production")
        assert production.id == report.version != teacher_version
        assert production.tags["published"] == STUDENT_TAG and production.tags["dataset"] == "homedepot"
        assert production.tags["kept_layers"] == report.kept_layers and production.train_steps == 3
    finally:
        store.close()
    served, _ = load_policy(tmp_path / "offline" / "warm-start" / "homedepot" / "student" / "policy")
    assert served.config.num_hidden_layers == 3
    assert production.tags["prompt"] == "query" and hint_words(served) == 0


def test_a_hinted_warm_starts_student_learns_and_is_measured_on_the_hinted_prompt(
    tiny: Path, tmp_path: Path, sqlite_url: str
) -> None:
    from learner.offline.build import warm_start, warm_start_student

    asked: set[str] = set()

    def hints(query: str) -> list[str]:
        asked.add(query)
        return ["drill"]

    settings = _offline_settings(tmp_path, sqlite_url)
    warm_start(settings, steps=1, batch_size=2, base_dir=_five_layers(tiny, tmp_path), hints=hints)
    with pytest.raises(ValueError, match="hinted: its student needs the catalog's hints"):
        warm_start_student(settings, _small_student())
    asked.clear()

    report = warm_start_student(settings, _small_student(), hints=hints)

    source = tmp_path / "offline" / "warm-start" / "homedepot"
    evaluated = {p.source for p in q2q.read_pairs(source / "q2q" / "eval.jsonl")} & asked
    assert evaluated, "Table 2 is measured on the hinted prompt (held-out pairs' queries were hinted)"
    assert {p.source for p in q2q.read_pairs(source / "q2q" / "train.jsonl")} <= asked
    assert report.hinted and set(report.table2) == {"T/P", "S/cut", "S/P", "T→S/P"}
    served, _ = load_policy(source / "student" / "policy")
    assert hint_words(served) == RESULT_WORDS, "the student keeps its teacher's hint mark"
    store = open_store(settings)
    try:
        assert store.resolve("production").tags["prompt"] == "hinted"
    finally:
        store.close()
