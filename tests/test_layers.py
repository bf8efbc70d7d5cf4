"""Every import points down: qrloop.cli > streams | learner | simulators > qrloop > policy_store.

Parses every module of the five packages (no import is executed) and fails on an import of a higher layer,
or of a sibling component (streams, learner and simulators are independent: the root composes them). Imports
inside functions count the same as those at the top: a function-local import is no way around the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

from qrloop.settings import REPO_ROOT

ROOT = "qrloop.cli"
COMPONENTS = ("streams", "learner", "simulators")
LAYERS = {ROOT: 3, **dict.fromkeys(COMPONENTS, 2), "qrloop": 1, "policy_store": 0}
PACKAGES = ("policy_store", "qrloop", *COMPONENTS)


def unit_of(module: str) -> str | None:
    """The layer unit a dotted module name belongs to (``qrloop.cli`` before its parent ``qrloop``;
    ``python -m qrloop``'s ``qrloop/__main__.py`` is the root's entry point)."""
    if module in (ROOT, "qrloop.__main__") or module.startswith(ROOT + "."):
        return ROOT
    top = module.split(".")[0]
    return top if top in LAYERS else None


def module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from qrloop import cli` names a module one level down from the one imported.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path = REPO_ROOT) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            mine = unit_of(module_of(path, root))
            assert mine is not None
            for line, name in imported(ast.parse(path.read_text(), str(path))):
                theirs = unit_of(name)
                if theirs is None or theirs == mine:
                    continue
                upward = LAYERS[theirs] > LAYERS[mine]
                sideways = LAYERS[theirs] == LAYERS[mine]  # one component importing another
                if upward or sideways:
                    found.append(f"{path.relative_to(root)}:{line} ({mine}) imports {name} ({theirs})")
    return found


def test_every_import_points_down() -> None:
    assert violations() == []


def test_the_check_finds_upward_and_sideways_imports(tmp_path: Path) -> None:
    """On a made-up tree holding imports this layout removed: each is reported, the allowed ones are not."""
    modules = {
        "policy_store/store.py": "from qrloop.settings import Settings\n",  # up
        "qrloop/serving.py": "def run():\n    from simulators.search import SearchEngine\n",  # up, local
        "qrloop/topics.py": "from qrloop import cli\n",  # up into the root through its parent package
        "streams/replay.py": "from learner import ope\n",  # sideways
        "learner/worker.py": "import policy_store\nfrom qrloop.events import encode\n",  # down: fine
        "qrloop/cli/main.py": "from streams.replay import replay\nfrom learner import worker\n",  # fine
    }
    for name, source in modules.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    found = violations(tmp_path)
    assert [line.split(":")[0] for line in found] == [
        "policy_store/store.py",
        "qrloop/serving.py",
        "qrloop/topics.py",
        "streams/replay.py",
    ], found
