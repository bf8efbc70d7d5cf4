"""The Q2Q (query → query) data set of the paper's §3.1, built without human annotation.

Queries and products form a bipartite graph whose edges are *relevant* labels (Home Depot: mean grade ≥ 2.67,
"exact or near-exact"; generally ``relevance >= threshold``). Two queries that share at least ``k`` relevant
products are candidate equivalents. A verifier then checks each candidate (the paper used Llama 3.3 70B; the
default here is the relevance model M1: each query's other relevant products must score as relevant to the
partner query too), and the real misspelling → correction list of the Home Depot competition adds one-way
rewrites. Graph pairs go in both directions, as in the paper; spelling pairs only towards the correction.

Held-out queries (``qrloop.data.is_heldout``) never appear on either side: the online loop and its canary are
evaluated on them. The 80/20 evaluation split hashes the *unordered* pair, so (Q, Q̃) and (Q̃, Q) always land
on the same side and the evaluation never sees the mirror image of a training pair.

Everything but :func:`build_q2q` is a pure function over DataFrames of query strings, so the tests build a
graph by hand. Reference figures (Home Depot, grade ≥ 2.67, undirected): 6,362 pairs at k=1, 683 at k=2.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qrloop.data import is_heldout, load_prepared, normalise_query, source_folder
from qrloop.prompting import RESULT_DEPTH, RESULT_WORDS, DeepSearch, result_words
from qrloop.relevance import RelevanceModel
from qrloop.settings import Settings

SPELLING_FILE = "hd_query_spell_corrections.csv"
EVAL_FRACTION = 0.2
# Labels are stored as decimals (2.67 for "2 of 3 raters said perfect"); a hair of tolerance keeps a threshold
# typed as 2.67 from missing a grade that arrived as 2.6699999.
_EPS = 1e-9
# Which labels count as "relevant" per data set when the caller does not say: HD's "exact or near-exact"
# (data README), CrowdFlower's top grade, ESCI's Exact or Substitute (the paper's choice).
DEFAULT_RULES: dict[str, tuple[float | None, float | None]] = {
    "homedepot": (2.67, None),
    "crowdflower": (4.0, None),
    "esci": (None, 0.5),
}
DEFAULT_MIN_RELEVANCE = 0.5
# M1 (the cross-encoder) scores held-out HD labels at 0.76 on average for grade >= 2.67, 0.68 for 2-2.67 and
# 0.65 below 2 (800 labels): 0.7 is where "relevant" begins. The paper's 70B verifier had no such number.
M1_THRESHOLD = 0.7

# Words of a judged product's title that a title pair's target keeps: enough for the search engine to find the
# product (bench_headroom: two such rewrites per held-out query take the judged-relevant recall to 2.5× the
# original's), few enough to read as a query.
TITLE_WORDS = 6

# Where an expansion pair looks for its terms: the words a hinted prompt shows (qrloop.prompting), from the
# titles of the query's own top 30; on 50 held-out Home Depot queries the best two expansions took the recall
# to 1.32x the original's when the learner's reward chose them, 1.72x when the labels did (bench_headroom's
# "expansions" rows).
EXPANSION_DEPTH = RESULT_DEPTH
EXPANSION_TERMS = RESULT_WORDS

# verifier(source, target) -> keep the pair?
Verifier = Callable[[str, str], bool]
# search(query, k) -> at most k product ids, best first (the search engine's ranking; the caller's, so that
# this module needs no search engine of its own): the shape a hinted prompt's words are searched with too
Search = DeepSearch
# score(query, product_texts) -> M1 scores in [0, 1], the shape of qrloop.relevance.RelevanceModel.score
Scorer = Callable[[str, Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class QueryPair:
    """One directed rewrite: ``source`` is what the shopper typed, ``target`` what the policy should write."""

    source: str
    target: str
    origin: str  # "graph", "spelling", "title" or "expansion"
    shared: int  # relevant products the two queries share (0 for spelling pairs, 1 for title and expansion)
    split: str  # "train" or "eval"


@dataclass
class Q2QReport:
    dataset: str
    k: int
    rule: str  # which labels made an edge, e.g. "grade >= 2.67"
    verifier: str  # what checked the graph pairs
    stages: dict[str, int] = field(default_factory=dict)  # stage name -> pairs left, in pipeline order
    params: dict[str, Any] = field(default_factory=dict)  # what built it (a cached build is reused if equal)
    train: int = 0
    eval: int = 0
    out_dir: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir) if self.out_dir else None
        return data


# ------------------------------------------------------------------------------------------------ the graph


def default_rule(dataset: str) -> tuple[float | None, float | None]:
    """(min_grade, min_relevance) that defines a relevant edge for ``dataset``."""
    return DEFAULT_RULES.get(dataset, (None, DEFAULT_MIN_RELEVANCE))


def describe_rule(min_grade: float | None, min_relevance: float | None) -> str:
    return f"grade >= {min_grade:g}" if min_grade is not None else f"relevance >= {min_relevance:g}"


def relevant_edges(
    triples: pd.DataFrame, *, min_grade: float | None = None, min_relevance: float | None = None
) -> pd.DataFrame:
    """The graph's edges: distinct (query, product_id) whose label passes the rule.

    ``triples`` has columns ``query``, ``product_id`` and ``grade`` and/or ``relevance``. ``min_grade`` (the
    source's own scale) wins when given; otherwise ``min_relevance`` (the [0, 1] scale every data set shares).
    """
    if min_grade is not None:
        keep = triples["grade"].astype(float) >= min_grade - _EPS
    else:
        threshold = DEFAULT_MIN_RELEVANCE if min_relevance is None else min_relevance
        keep = triples["relevance"].astype(float) >= threshold - _EPS
    return triples.loc[keep, ["query", "product_id"]].drop_duplicates().reset_index(drop=True)


def shared_product_pairs(edges: pd.DataFrame, k: int = 1) -> pd.DataFrame:
    """Unordered query pairs (``query_a`` < ``query_b``) sharing at least ``k`` products, with the count.

    A self-join on product: each product contributes every pair of its relevant queries. Products have few
    relevant queries each (HD: at most a handful), so this stays small.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    joined = edges.merge(edges, on="product_id", suffixes=("_a", "_b"))
    joined = joined[joined["query_a"] < joined["query_b"]]
    counts = joined.groupby(["query_a", "query_b"]).size().rename("shared").reset_index()
    counts = counts[counts["shared"] >= k]
    return counts.sort_values(["query_a", "query_b"], kind="stable").reset_index(drop=True)


def title_prefix(title: str, words: int) -> str:
    """The first ``words`` words of a product title: what a rewrite that names the product would say."""
    return " ".join(title.split()[:words])


def title_pairs(
    edges: pd.DataFrame,
    titles: Mapping[str, str],
    search: Search,
    *,
    words: int = TITLE_WORDS,
    per_query: int = 2,
    top_k: int = 10,
) -> pd.DataFrame:
    """(``query_a``, ``query_b``): ``query_b`` the first ``words`` words (lower-cased) of the title of a
    product judged relevant to ``query_a`` that ``query_a``'s own top ``top_k`` misses; at most ``per_query``
    per query, in product-id order. Held-out queries are skipped (and never searched).

    The graph's pairs rewrite a query into another real query, which mostly finds what the original already
    shows: sampled from a warm start on them alone, even the best two of eight rewrites by the human labels
    added 5% to the original's recall of judged-relevant products (``bench_headroom.py``). A rewrite that
    names a judged product the original misses is what search needs from it.
    """
    rows: list[tuple[str, str]] = []
    for query, products in edges.groupby("query", sort=True)["product_id"]:
        if is_heldout(query):
            continue
        shown = {str(p) for p in search(query, top_k)[:top_k]}
        for product in sorted({str(p) for p in products} - shown)[:per_query]:
            target = title_prefix(titles.get(product, ""), words).lower()
            if target:
                rows.append((query, target))
    return pd.DataFrame(rows, columns=["query_a", "query_b"]).drop_duplicates().reset_index(drop=True)


def expansion_pairs(
    edges: pd.DataFrame,
    titles: Mapping[str, str],
    search: Search,
    *,
    depth: int = EXPANSION_DEPTH,
    terms: int = EXPANSION_TERMS,
    per_query: int = 2,
    top_k: int = 10,
    correct: Callable[[str], str] | None = None,
) -> pd.DataFrame:
    """(``query_a``, ``query_b`` = ``query_a`` + one word): the expansions of each training query by one of
    its result words (``qrloop.prompting.result_words``, from the titles of its top ``depth``) whose top
    ``top_k`` shows the most products judged relevant to it that its own top ``top_k`` misses (at least
    one); at most ``per_query`` per query, the most such products first (ties by term order). Held-out
    queries are skipped (and never searched).

    A title pair names one judged product in six words of its title; an expansion keeps the shopper's words
    and adds the one the engine needs. A policy that sees only the query cannot know that word (a warm start
    with these pairs did worse than without them); one whose prompt lists its results' words can
    (``benchmarks/bench_hints.py``).

    With ``correct`` (the catalog's spelling) a misspelled query is expanded as corrected, from the words of
    the corrected query's results, as a hinted prompt shows them (``qrloop.prompting.results_hints``): an
    expansion that kept the typo would teach the policy to copy it past the correction its prompt shows.
    """
    rows: list[tuple[str, str]] = []
    for query, products in edges.groupby("query", sort=True)["product_id"]:
        if is_heldout(query):
            continue
        judged = {str(p) for p in products}
        base = correct(query) if correct is not None else query
        results = [str(p) for p in search(base, depth)[:depth]]
        # what a rewrite adds to: the typed query's own top k (the corrected query's are a rewrite's)
        shown = set(results[:top_k] if base == query else search(query, top_k)[:top_k])
        if not judged - shown:
            continue
        scored = []
        for rank, term in enumerate(result_words(base, (titles.get(p, "") for p in results), terms)):
            expanded = f"{base} {term}"
            added = len(judged & ({str(p) for p in search(expanded, top_k)[:top_k]} - shown))
            if added:
                scored.append((-added, rank, expanded.lower()))
        rows.extend((query, expanded) for _, _, expanded in sorted(scored)[:per_query])
    return pd.DataFrame(rows, columns=["query_a", "query_b"]).drop_duplicates().reset_index(drop=True)


def drop_heldout(pairs: pd.DataFrame) -> pd.DataFrame:
    """Pairs with no held-out query on either side."""
    touched = pairs["query_a"].map(is_heldout) | pairs["query_b"].map(is_heldout)
    return pairs[~touched].reset_index(drop=True)


def drop_identical(pairs: pd.DataFrame) -> pd.DataFrame:
    """Pairs whose two queries differ after normalisation ("Paint" → "paint" teaches nothing)."""
    same = pairs["query_a"].map(normalise_query) == pairs["query_b"].map(normalise_query)
    return pairs[~same].reset_index(drop=True)


def verify(
    pairs: pd.DataFrame, verifier: Verifier, progress: Callable[[int, int], None] | None = None
) -> pd.DataFrame:
    """Keep the pairs ``verifier(query_a, query_b)`` accepts."""
    keep = []
    for i, (a, b) in enumerate(zip(pairs["query_a"], pairs["query_b"], strict=True)):
        keep.append(bool(verifier(a, b)))
        if progress:
            progress(i + 1, len(pairs))
    return pairs[np.array(keep, dtype=bool)].reset_index(drop=True) if len(pairs) else pairs


def relevance_verifier(
    score: Scorer,
    products_of: Mapping[str, Sequence[str]],
    *,
    threshold: float = M1_THRESHOLD,
    max_products: int = 3,
) -> Verifier:
    """M1 as the semantic-equivalence check: a pair passes when, in both directions, the products relevant to
    one query *but not labelled for the other* score on average ≥ ``threshold`` against the other query.

    The shared products are already relevant to both by the labels, so only the rest carry information; a
    side with nothing beyond the shared products passes. At most ``max_products`` (first by text, so the
    result is deterministic) are scored per side: M1 is a cross-encoder, one forward per (query, product).
    """

    def one_way(query: str, partner: str) -> bool:
        own = set(products_of.get(query, ()))
        others = sorted(t for t in set(products_of.get(partner, ())) if t not in own)[:max_products]
        return not others or float(np.mean(score(query, others))) >= threshold

    return lambda a, b: one_way(a, b) and one_way(b, a)


# ------------------------------------------------------------------------------------- spelling corrections


def read_spelling_pairs(path: Path) -> pd.DataFrame:
    """The misspelling → correction list as (query_a = misspelled, query_b = corrected)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    pairs = pd.DataFrame({"query_a": table["query_misspelled"], "query_b": table["query_corrected"]})
    pairs = pairs[(pairs["query_a"].str.strip() != "") & (pairs["query_b"].str.strip() != "")]
    return pairs.reset_index(drop=True)


def dataset_spelling_pairs(settings: Settings, path: Path | None = None) -> pd.DataFrame:
    """The data set's misspelling list (``path``, default its ``SPELLING_FILE``) as
    :func:`read_spelling_pairs` reads it; empty where the data set ships none."""
    path = path or source_folder(settings) / SPELLING_FILE
    return read_spelling_pairs(path) if path.is_file() else pd.DataFrame(columns=["query_a", "query_b"])


def known_corrections(settings: Settings) -> dict[str, str]:
    """The data set's misspelling list as normalised misspelled query → its correction (empty where the data
    set ships none): what a run's served rewrites and pairs are checked against."""
    table = dataset_spelling_pairs(settings)
    return {normalise_query(a): b for a, b in zip(table["query_a"], table["query_b"], strict=True)}


# -------------------------------------------------------------------------------------- directed + split


def pair_split(a: str, b: str, eval_fraction: float = EVAL_FRACTION) -> str:
    """The split ("eval" or "train") from a hash of the unordered, normalised pair: stable across runs and
    machines, and the same for both directions."""
    key = "\x1f".join(sorted((normalise_query(a), normalise_query(b))))
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10_000
    return "eval" if bucket < round(eval_fraction * 10_000) else "train"


def directed_pairs(
    graph: pd.DataFrame,
    spelling: pd.DataFrame,
    eval_fraction: float = EVAL_FRACTION,
    titles: pd.DataFrame | None = None,
    expansions: pd.DataFrame | None = None,
) -> list[QueryPair]:
    """Graph pairs in both directions; spelling, title and expansion pairs one way, towards the correction,
    the title or the expansion; one row per normalised (source, target), graph first (a spelling pair that the
    graph also found keeps its shared count)."""
    rows: list[QueryPair] = []
    for a, b, shared in zip(graph["query_a"], graph["query_b"], graph["shared"], strict=True):
        split = pair_split(a, b, eval_fraction)
        rows.append(QueryPair(a, b, "graph", int(shared), split))
        rows.append(QueryPair(b, a, "graph", int(shared), split))
    for a, b in zip(spelling["query_a"], spelling["query_b"], strict=True):
        rows.append(QueryPair(a, b, "spelling", 0, pair_split(a, b, eval_fraction)))
    if titles is not None:
        for a, b in zip(titles["query_a"], titles["query_b"], strict=True):
            rows.append(QueryPair(a, b, "title", 1, pair_split(a, b, eval_fraction)))
    if expansions is not None:
        for a, b in zip(expansions["query_a"], expansions["query_b"], strict=True):
            rows.append(QueryPair(a, b, "expansion", 1, pair_split(a, b, eval_fraction)))
    seen: set[tuple[str, str]] = set()
    unique = []
    for pair in rows:
        key = (normalise_query(pair.source), normalise_query(pair.target))
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    return unique


def write_pairs(pairs: Iterable[QueryPair], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_pairs(path: Path) -> list[QueryPair]:
    with path.open(encoding="utf-8") as fh:
        return [QueryPair(**json.loads(line)) for line in fh if line.strip()]


# ------------------------------------------------------------------------------------------- the builder


def q2q_dir(settings: Settings) -> Path:
    return settings.cache_dir / "offline" / "q2q"


def q2q_params(**params: Any) -> dict[str, Any]:
    """The parameters that define a Q2Q build, JSON-shaped (compared with a cached build's)."""
    return json.loads(json.dumps(params))


def load_report(out_dir: Path) -> Q2QReport | None:
    """The report of the Q2Q build in ``out_dir``, if one finished there."""
    path = out_dir / "report.json"
    if not (path.is_file() and (out_dir / "train.jsonl").is_file() and (out_dir / "eval.jsonl").is_file()):
        return None
    data = json.loads(path.read_text())
    data["out_dir"] = out_dir
    return Q2QReport(**data)


def _triples(settings: Settings) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """(dataset name, labels with query text, product titles and texts) from the prepared data."""
    dataset = load_prepared(settings)
    triples = dataset.labels.merge(dataset.queries[["query_id", "query"]], on="query_id")
    return dataset.name, triples, dataset.products[["product_id", "title", "text"]]


def _titles(products: pd.DataFrame) -> dict[str, str]:
    return dict(zip(products["product_id"].astype(str), products["title"].astype(str), strict=True))


def _products_of(edges: pd.DataFrame, products: pd.DataFrame) -> dict[str, list[str]]:
    texts = edges.merge(products, on="product_id")
    return {q: list(group["text"]) for q, group in texts.groupby("query", sort=False)}


def build_q2q(
    settings: Settings,
    *,
    k: int = 1,
    min_grade: float | None = None,
    min_relevance: float | None = None,
    use_m1: bool = True,
    m1_threshold: float = M1_THRESHOLD,
    m1_max_products: int = 3,
    scorer: Scorer | None = None,
    llm_verifier: Verifier | None = None,
    spelling_file: Path | None = None,
    search: Search | None = None,
    titles: bool = True,
    expansions: bool = False,
    correct: Callable[[str], str] | None = None,
    title_words: int = TITLE_WORDS,
    eval_fraction: float = EVAL_FRACTION,
    out_dir: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Q2QReport:
    """Build ``<cache_dir>/offline/q2q/{train,eval}.jsonl`` and say how many pairs each stage kept.

    ``min_grade``/``min_relevance`` default to the data set's rule (HD: grade ≥ 2.67). ``scorer`` defaults to
    ``RelevanceModel.load(settings).score`` (M1). ``llm_verifier``, when given, checks every pair (graph and
    spelling) after M1, as the paper's 70B model did. ``search``, when given, adds title pairs
    (:func:`title_pairs`: the judged products each training query's own results miss) unless ``titles`` is
    false, and expansion pairs (:func:`expansion_pairs`, of each query as ``correct`` spells it) where
    ``expansions`` is true. ``progress(stage, done, total)`` reports the slow part.
    """
    name, triples, products = _triples(settings)
    if min_grade is None and min_relevance is None:
        min_grade, min_relevance = default_rule(name)
    edges = relevant_edges(triples, min_grade=min_grade, min_relevance=min_relevance)
    report = Q2QReport(name, k, describe_rule(min_grade, min_relevance), "none")
    report.params = q2q_params(
        k=k,
        min_grade=min_grade,
        min_relevance=min_relevance,
        use_m1=use_m1,
        m1_threshold=m1_threshold,
        m1_max_products=m1_max_products,
        llm=llm_verifier is not None,
        title_words=title_words if search is not None and titles else None,
        expansions=search is not None and expansions,
        eval_fraction=eval_fraction,
        # only where true, so that a build cached before the option still matches its own parameters
        **({"spelled_expansions": True} if search is not None and expansions and correct else {}),
    )

    graph = shared_product_pairs(edges, k)
    report.stages["graph pairs (undirected)"] = len(graph)
    graph = drop_heldout(graph)
    report.stages["graph: no held-out query"] = len(graph)
    graph = drop_identical(graph)
    report.stages["graph: not identical"] = len(graph)
    if use_m1:
        if scorer is None:
            model = RelevanceModel.load(settings)
            scorer, report.verifier = model.score, f"M1 ({model.kind}) >= {m1_threshold:g}"
        else:
            report.verifier = f"M1 (given scorer) >= {m1_threshold:g}"
        check = relevance_verifier(
            scorer, _products_of(edges, products), threshold=m1_threshold, max_products=m1_max_products
        )
        graph = verify(graph, check, (lambda d, t: progress("M1 verification", d, t)) if progress else None)
        report.stages["graph: verified by M1"] = len(graph)

    spelling = dataset_spelling_pairs(settings, spelling_file)
    report.stages["spelling pairs (file)"] = len(spelling)
    spelling = drop_heldout(spelling)
    report.stages["spelling: no held-out query"] = len(spelling)
    spelling = drop_identical(spelling)
    report.stages["spelling: not identical"] = len(spelling)

    if llm_verifier is not None:
        report.verifier += " + LLM"
        graph, spelling = verify(graph, llm_verifier), verify(spelling, llm_verifier)
        report.stages["graph: verified by LLM"] = len(graph)
        report.stages["spelling: verified by LLM"] = len(spelling)

    named = expanded = None
    if search is not None and titles:
        named = title_pairs(edges, _titles(products), search, words=title_words)
        report.stages["title pairs (judged products the query's top 10 misses)"] = len(named)
        named = drop_identical(drop_heldout(named))
        report.stages["title: no held-out query, not identical"] = len(named)
    if search is not None and expansions:
        expanded = expansion_pairs(edges, _titles(products), search, correct=correct)
        report.stages["expansion pairs (query + a word of its results' titles)"] = len(expanded)
        expanded = drop_identical(drop_heldout(expanded))
        report.stages["expansion: no held-out query, not identical"] = len(expanded)

    pairs = directed_pairs(graph, spelling, eval_fraction, named, expanded)
    report.stages["directed pairs"] = len(pairs)
    out = out_dir or q2q_dir(settings)
    report.train = write_pairs((p for p in pairs if p.split == "train"), out / "train.jsonl")
    report.eval = write_pairs((p for p in pairs if p.split == "eval"), out / "eval.jsonl")
    report.stages["train (directed)"] = report.train
    report.stages["eval (directed)"] = report.eval
    report.out_dir = out
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report
