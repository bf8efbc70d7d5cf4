"""Would the policy write what search needs if its prompt showed the words of the query's results? (issue #12)

    .venv/bin/python benchmarks/bench_hints.py [--steps 100] [--no-expansions] [--queries 60] [--samples 8]
        [--datasets homedepot,crowdflower] [--threads 2] [--out DIR]

``bench_headroom.py`` found the policy's *support* to be what holds the human-label recall back: the engine's
ranks 11-30 hold 1.65x the judged-relevant products of the original's top 10, and the query plus one word its
results' titles use often (pseudo-relevance feedback, the "expansions" rows) reaches 1.32x when the learner's
reward picks two of ten; the policy's own samples, which cannot see the catalog, append numbers instead.
This trains two warm starts side by side on the same pairs, for the same steps from the same base policy, and
measures both as ``bench_headroom.py`` does (same held-out queries and seeds):

- **plain**: the query alone (a policy warm-started without ``--hints``);
- **hinted**: the query followed by one line, ``Words in its results: w1, w2, ...``: the ten words the titles
  of its top 30 use most that it does not already say (``qrloop.prompting.result_words``).

The pairs are the warm start's (graph, spelling and title pairs) plus, unless ``--no-expansions``, expansion
pairs (each training query and the one word that finds the most judged-relevant products it misses). The
hinted policy is trained as ``qrloop offline warm-start --titles --expansions --hints`` trains it. About 25
minutes at 2 threads (two SFTs of 8 minutes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_headroom import collect, report
from bench_online import load_average, set_threads

from learner.offline.build import OfflineConfig, hinted_pairs
from learner.offline.q2q import QueryPair, build_q2q, read_pairs
from learner.offline.sft import train_sft
from qrloop.catalog import Catalog
from qrloop.models import require_policy
from qrloop.prompting import result_words, user_message
from qrloop.serving import load_version
from qrloop.settings import Settings, get_settings
from simulators.search import SearchEngine


def hinted(query: str, titles: Sequence[str]) -> str:
    """The user message a hinted policy sees: the query, then the words its results' titles use most."""
    return user_message(query, result_words(query, titles))


def warm_start_pairs(
    settings: Settings, engine: SearchEngine, expansions: bool, out: Path
) -> list[QueryPair]:
    """The warm start's unverified training pairs with title pairs, plus expansion pairs where asked."""
    build_q2q(settings, use_m1=False, search=engine.search, expansions=expansions, out_dir=out / "q2q")
    return read_pairs(out / "q2q" / "train.jsonl")


def hint_pairs(settings: Settings, engine: SearchEngine, pairs: Sequence[QueryPair]) -> list[QueryPair]:
    """``pairs`` with each source hinted by the words of its own results, as the hinted warm start trains."""
    catalog = Catalog.open(settings)
    return hinted_pairs(pairs, catalog.hints(engine.search))


def train(settings: Settings, pairs: Sequence[QueryPair], out: Path, steps: int) -> Path:
    started = time.perf_counter()
    result = train_sft(
        require_policy(settings),
        pairs,
        out,
        max_steps=steps,
        learning_rate=OfflineConfig.learning_rate,
        seed=settings.seed,
    )
    print(
        f"{out.name}: {result.steps} SFT steps, loss {result.losses[0]:.2f} → {result.losses[-1]:.2f}, "
        f"{time.perf_counter() - started:.0f} s; {load_average()}"
    )
    return out


def main() -> None:
    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument(
        "--steps", type=int, default=100, help="SFT steps of each warm start (the --titles one's)"
    )
    root.add_argument("--no-expansions", action="store_true", help="the warm start's pairs only")
    root.add_argument("--queries", type=int, default=60, help="labelled held-out queries per data set")
    root.add_argument("--samples", type=int, default=8, help="rewrites sampled per query")
    root.add_argument("--title-words", type=int, default=6, help="words of a judged title an oracle keeps")
    root.add_argument("--datasets", default="homedepot,crowdflower")
    root.add_argument("--profiles", type=int, default=1, help="(unused here; heldout_setup builds a judge)")
    root.add_argument("--m1-threshold", type=float, default=0.5)
    root.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    root.add_argument("--seed", type=int, default=1234)
    root.add_argument("--out", help="where the two policies are kept; default: a temporary directory")
    args = root.parse_args()
    started = time.perf_counter()
    base = get_settings()  # the training catalog: the configured data set (Home Depot by default)
    set_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="qrloop-hints-"))
    engine = SearchEngine.open(base)  # one index for the pairs and their hints
    pairs = warm_start_pairs(base, engine, not args.no_expansions, out)
    print(f"{len(pairs)} training pairs of {base.dataset} (expansions: {not args.no_expansions}); {out}")
    policies = {
        "plain": train(base, pairs, out / "plain", args.steps),
        "hinted": train(base, hint_pairs(base, engine, pairs), out / "hinted", args.steps),
    }
    for dataset in args.datasets.split(","):
        settings = base.model_copy(update={"dataset": dataset})
        for name, path in policies.items():
            policy = load_version(path, None)
            report(
                f"{dataset}, {name} prompt",
                collect(settings, policy, args, hinted if name == "hinted" else None),
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s wall; {load_average()}")


if __name__ == "__main__":
    main()
