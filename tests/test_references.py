"""Every file the code and docs point at lives in the repository (nothing outside it, nothing missing)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("shortcutfm/**/*.py"),
           *ROOT.glob("shortcutfm/configs/*.yaml"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/*.md"),
           *ROOT.glob("benchmarks/*.sh")]
OUTSIDE = re.compile(r"\.\./shared|\b(METHOD|CALIBRATION|ECOSYSTEM|DEVICE|STYLE)\.md\b")
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|shortcutfm|benchmarks|tests)/[\w./-]+\.(?:md|png|json|py|yaml|sh))")


def test_nothing_points_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in SOURCES
             for match in OUTSIDE.finditer(path.read_text(encoding="utf-8"))]
    assert not found, found


def test_every_repository_path_named_exists():
    missing = []
    for path in SOURCES:
        for match in REPO_PATH.finditer(path.read_text(encoding="utf-8")):
            name = match.group(1).rstrip(".")
            target = (path.parent / name) if path.parent.name == "docs" and (path.parent / name).exists() else ROOT / name
            if "*" not in name and "<" not in name and not target.exists() and not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing
