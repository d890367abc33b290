"""The layering rule the README states, checked on every module's imports.

api → runtime → service → engine → backends; each layer imports only the layers
below it and the shared leaves. Only ``backends.sentence_transformers`` imports torch,
and nothing below the API imports FastAPI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fake_openai_server"

LEAVES = {
    "errors",
    "settings",
    "wire",
    "workers",
    "logs",
    "families",
    "memory",
    "metrics",
    "cpus",
}
# What each layer may import from the package (besides itself and the leaves).
ALLOWED = {
    "api": {"runtime", "service", "backends.base"},
    "runtime": {"service", "engine", "backends.base"},
    "service": {"engine.core", "backends.base", "backends.vocabulary"},
    "engine": {"backends.base"},
    "backends": set(),
    "cli": {"api", "runtime", "backends.base"},
    # An entry point too: it reads the settings as the CLI does, and asks the Hub as the
    # engine does before it loads.
    "preload": {"cli", "backends.hub"},
    "metrics": {"engine.core"},  # the batch report it observes
}
TORCH_MODULES = {"backends/sentence_transformers.py"}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "fake_openai_server":
                names.update(f"fake_openai_server.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_layer_may(path: Path) -> None:
    layer = layer_of(path)
    allowed = ALLOWED.get(layer, set()) | LEAVES | {layer}
    for name in imports(path):
        if not name.startswith("fake_openai_server."):
            continue
        target = name.removeprefix("fake_openai_server.")
        assert any(target == a or target.startswith(a + ".") for a in allowed), (
            f"{path.relative_to(PACKAGE)} ({layer}) imports {name}"
        )
    relative = str(path.relative_to(PACKAGE))
    if relative not in TORCH_MODULES:
        assert not any(n == "torch" or n.startswith("torch.") for n in imports(path)), relative
    if layer != "api":
        assert not any(n.split(".")[0] in ("fastapi", "starlette") for n in imports(path)), relative
