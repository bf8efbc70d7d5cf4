"""``qrloop sim ...``: look at the simulators by hand (search, shoppers, index).

Each command is a thin shell: the work is in ``simulators/*`` and this module only formats it.
"""

from __future__ import annotations

import json

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from qrloop.catalog import Catalog
from qrloop.settings import get_settings
from simulators.judge import ClickModelJudge
from simulators.search import DEFAULT_BACKEND, SearchEngine, ensure_index
from simulators.shoppers import ShopperTraffic

app = typer.Typer(help="Simulated search engine, shoppers and judge.", no_args_is_help=True)
console = Console()

BACKEND_HELP = "Search engine: tantivy (the default) or bm25s."


@app.command("search")
def search(
    query: str = typer.Argument(..., help="A shopper's query."),
    k: int | None = typer.Option(None, "-k", "--top-k", help="Products to show (default: rewriter.top_k)."),
    backend: str = typer.Option(DEFAULT_BACKEND, help=BACKEND_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Search the catalog; human labels are shown where raters judged the (query, product) pair."""
    settings = get_settings()
    catalog = Catalog.open(settings)
    engine = SearchEngine.open(settings, backend, dataset=catalog.dataset)
    ids = engine.search(query, k)
    if as_json:
        rows = [
            {
                "rank": rank,
                "product_id": pid,
                "title": catalog.product(pid).title,
                "label": catalog.grade(query, pid),
            }
            for rank, pid in enumerate(ids, start=1)
        ]
        print(json.dumps(rows))
        return
    # Readable at 80 columns and in a pipe: short cells never wrap; the title folds.
    table = Table(title=f"{engine.name}: {query!r} ({len(ids)} products)", box=box.SIMPLE_HEAD)
    for column in ("#", "product", "title", "colour", "material", "label"):
        table.add_column(
            column, no_wrap=column != "title", overflow="fold" if column == "title" else "ellipsis"
        )
    for rank, pid in enumerate(ids, start=1):
        product, grade = catalog.product(pid), catalog.grade(query, pid)
        label = "" if grade is None else f"{grade:.2f}"
        table.add_row(str(rank), pid, product.title, product.color, product.material, label)
    console.print(table)
    labelled = catalog.labelled(query)
    if labelled:
        found = sum(1 for pid in ids if pid in labelled)
        console.print(f"{found} of the {len(labelled)} labelled products for this query were retrieved.")


@app.command("shoppers")
def shoppers(
    n: int = typer.Option(3, "-n", help="Simulated shoppers (queries)."),
    backend: str = typer.Option(DEFAULT_BACKEND, help=BACKEND_HELP),
) -> None:
    """Simulate a few shoppers searching the original query and show their interaction streams."""
    settings = get_settings()
    catalog = Catalog.open(settings)
    engine = SearchEngine.open(settings, backend, dataset=catalog.dataset)
    traffic = ShopperTraffic(settings, catalog, ClickModelJudge.default(settings, catalog))
    for _ in range(n):
        query_id, query, profile = traffic.next_query()
        events = traffic.interactions(profile, query, {"original": engine.search(query)})
        console.print(f"\n[bold]{profile.shopper_id}[/] searched [cyan]{query!r}[/] (query {query_id})")
        console.print(f"[dim]{profile.bio()}[/]")
        table = Table(show_header=True)
        for column in ("delivered", "event time (s)", "list", "pos", "kind", "product"):
            table.add_column(column)
        for order, event in enumerate(events):
            if event.kind == "impression":
                continue  # every shown product has one; the table shows what the shopper did
            title = catalog.product(event.product_id).title
            table.add_row(
                str(order), f"{event.delay_s:.1f}", event.list_key, str(event.position), event.kind, title
            )
        impressions = sum(e.kind == "impression" for e in events)
        console.print(table if table.row_count else "[dim]no clicks[/]")
        console.print(f"{impressions} impressions, {len(events)} events delivered (duplicates included)")


@app.command("index")
def index(backend: str = typer.Option(DEFAULT_BACKEND, help=BACKEND_HELP)) -> None:
    """Build the search index of the configured catalog (a no-op when the cached one is current)."""
    info = ensure_index(get_settings(), backend)
    state = "up to date" if info.built_s is None else f"built in {info.built_s:.1f} s"
    console.print(f"[green]{info.backend} index[/] of {info.documents:,} products {state}: {info.folder}")
