"""What the benchmarks share: `--json PATH` writes the figures a benchmark printed as one JSON file.

    python bench/loader.py --json loader.json       # the table on stdout, the same figures in loader.json

The tests run each benchmark this way, as a user would, on a tiny shape.
"""

from __future__ import annotations

import argparse
import json


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")


def comma_list(parser: argparse.ArgumentParser, value: str, known, what: str) -> list[str]:
    """A comma-separated choice among `known`; an unknown name is a usage error that lists the known ones."""
    names = value.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def jsonable(value):
    """Tuple keys ((dataset, mode)) become "dataset/mode"; everything else as it is."""
    if isinstance(value, dict):
        return {"/".join(k) if isinstance(k, tuple) else k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_results(path: str | None, value) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(jsonable(value), f, indent=1)
