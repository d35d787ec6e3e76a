"""The house rules, checked on the source: imports run downward, nothing imports the benchmarks, no file is too long.

    config, device                      the ground floor: import nothing of the package
    models/                             config and each other only
    data/                               config, data/ and the models' image code (vision_tower, image_features)
    interop/, build                     below training, generation and serving: none of those, no benchmarks
    training/, generation/, serving/    side by side: training and generation never import each other nor serving
                                        (serving answers through generation)
    bench/                              the top floor with cli and demo: nothing else imports it
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "minimind_v"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every minimind_v module the file imports, at any depth of the file (function-level imports too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("minimind_v")}


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(path): imports(path) for path in SOURCES}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def offending(module: str, allowed) -> list[str]:
    return sorted(name for name in GRAPH[module] if not allowed(name))


def test_the_graph_is_read():
    assert "minimind_v.models.vlm" in GRAPH and "minimind_v.config" in GRAPH["minimind_v.models.vlm"]
    assert "minimind_v.generation" in GRAPH["minimind_v.serving.openai_api"]
    assert "minimind_v.training.trainer" in GRAPH["minimind_v.cli.train"]  # a function-level import counts too


RULES = {
    "config": lambda name: layer(name) == "config",
    "device": lambda name: layer(name) == "device",
    "models": lambda name: layer(name) in ("config", "models"),
    "data": lambda name: layer(name) in ("config", "data") or name.startswith(
        ("minimind_v.models.vision_tower", "minimind_v.models.image_features")),
    "interop": lambda name: layer(name) in ("config", "device", "models", "interop"),
    "build": lambda name: layer(name) in ("config", "device", "models", "data", "interop", "build"),
    "training": lambda name: layer(name) not in ("generation", "serving", "bench", "cli", "demo", "evaluate"),
    "generation": lambda name: layer(name) not in ("training", "serving", "bench", "cli", "demo", "evaluate"),
    "serving": lambda name: layer(name) not in ("training", "bench", "cli", "demo", "evaluate"),
    "bench": lambda name: layer(name) != "cli",  # the command line sits on top of the benchmarks
}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) in RULES))
def test_imports_run_downward(module):
    assert offending(module, RULES[layer(module)]) == [], f"{module} imports above its floor"


def test_nothing_imports_the_benchmarks():
    users = sorted(m for m, names in GRAPH.items()
                   if layer(m) not in ("bench", "cli") and any(layer(n) == "bench" for n in names))
    assert users == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_file_reads_in_one_sitting(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES
