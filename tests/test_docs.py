"""The documentation stays true to the code: every config key is in docs/config.md with its
default, and every relative link of the README and docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raycv import config

REPO = Path(__file__).parents[1]
SECTIONS = {"data": config.DataSection, "model": config.ModelSection, "optim": config.OptimSection,
            "train": config.TrainSection, "scaling": config.ScalingSection, "run": config.RunSection,
            "infer": config.InferSection, "tune": config.TuneSection, "train.distill": config.DistillSection,
            "train.prune": config.PruneSection}


def test_every_config_key_is_documented_with_its_default():
    rows = {}
    for line in (REPO / "docs" / "config.md").read_text().splitlines():
        m = re.match(r"\| `([\w.]+)` \| `([^`]*)` \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    expected = {}
    for name, section in SECTIONS.items():
        for key, field in section.model_fields.items():
            if isinstance(field.get_default(call_default_factory=True), config._Section):
                continue  # a nested section: its keys are rows of their own
            expected[f"{name}.{key}"] = repr(field.get_default(call_default_factory=True))
    assert rows == expected


DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_somewhere(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_every_result_the_benchmarks_cite_is_committed():
    """bench/results/ is ignored (other runs' outputs stay untracked), so a cited figure's file must
    be added on purpose: a citation of a file that is not in the repository fails here."""
    import subprocess

    cited = set(re.findall(r"results/[\w.-]+\.(?:json|txt|png)", (REPO / "bench" / "README.md").read_text()))
    assert cited
    if (REPO / ".git").exists():
        tracked = set(subprocess.run(["git", "ls-files", "bench/results"], cwd=REPO, capture_output=True, text=True,
                                     check=True).stdout.split())
        missing = {c for c in cited if f"bench/{c}" not in tracked}
    else:
        missing = {c for c in cited if not (REPO / "bench" / c).exists()}
    assert not missing, f"bench/README.md cites files that are not committed: {sorted(missing)} (git add -f them)"
