"""docs/metrics.md is generated from the code, and documents every key the suite's runs logged.

Named test_zz_* so it runs after the other files in the same session.
"""
from __future__ import annotations

import os
from pathlib import Path

from lethe.metrics import reference

ROOT = Path(__file__).resolve().parents[1]


def test_docs_metrics_md_is_generated_from_the_code():
    assert (ROOT / "docs" / "metrics.md").read_text() == reference.as_markdown(), (
        "regenerate it: python -m lethe.metrics.reference > docs/metrics.md")


def test_every_logged_metric_key_is_documented():
    path = Path(os.environ["LETHE_METRIC_KEYS_FILE"])
    logged = set(path.read_text().split()) if path.exists() else set()
    assert reference.undocumented(logged) == []


def test_lookup_matches_placeholders_only_where_they_are():
    assert reference.lookup("acc/exp_12").key == "acc/exp_<j>"
    assert reference.lookup("acc/exp_x") is None
    assert reference.lookup("forgetting/avg").variant.startswith("Chaudhry")
