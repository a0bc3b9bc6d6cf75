"""The package's layers: no module imports one above its layer, and no two packages import each other.

Layers, bottom up (a module may import its own layer and those below):
errors, atomic, distributed, tracking_outbox, mlflow_local -> datasets, config -> labels, metrics, shards ->
data, tracking -> model -> demo_assets -> train. The entry points live at the top, in train.
"""

from __future__ import annotations

import ast
import os

import egmf

PACKAGE = os.path.dirname(egmf.__file__)
LAYERS = [
    {"errors", "atomic", "distributed", "tracking_outbox", "mlflow_local"},
    {"datasets", "config"},
    {"labels", "metrics", "shards"},
    {"data", "tracking"},
    {"model"},
    {"demo_assets"},
    {"train"},
]


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def egmf_imports(path: str) -> set[str]:
    """Top-level parts (e.g. 'train' for egmf.train.config) of every egmf module that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("egmf.")}
    return found


def modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                part = os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")
                if part != "__init__":
                    yield path, part


def test_every_module_has_a_layer():
    assert {part for _, part in modules()} == set().union(*LAYERS)


def test_no_module_imports_above_its_layer():
    upward = [
        f"{os.path.relpath(path, PACKAGE)} ({part}) imports egmf.{other}"
        for path, part in modules()
        for other in egmf_imports(path)
        if layer_of(other) > layer_of(part)
    ]
    assert upward == []


def test_no_two_packages_import_each_other():
    edges = {(part, other) for path, part in modules() for other in egmf_imports(path) if other != part}
    assert sorted((a, b) for a, b in edges if (b, a) in edges) == []
