"""Every document the repository's code and docs point to is in the repository."""

from __future__ import annotations

import os
import re

from run_helpers import REPO

SKIP = {".git", ".venv", ".whl", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "demo"}
SUFFIXES = (".py", ".md", ".toml", ".sh", ".json", ".txt", "Makefile", "run")
CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
WRITTEN = "report.md"
"""A file the software writes (egmf-report), named in code and docs, not a document of the repository."""


def text_files():
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(SUFFIXES):
                yield os.path.join(folder, name)


def test_every_cited_markdown_file_exists():
    missing = []
    for path in text_files():
        text = open(path, encoding="utf-8", errors="replace").read()
        for cited in set(CITED.findall(text)):
            if os.path.basename(cited) == WRITTEN:
                continue
            here = os.path.join(os.path.dirname(path), cited)
            if not (os.path.exists(os.path.join(REPO, cited)) or os.path.exists(here)):
                missing.append(f"{os.path.relpath(path, REPO)} cites {cited}")
    assert missing == []
