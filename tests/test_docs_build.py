"""The documentation site builds with warnings as errors (`sphinx-build -W`), as `.ci/run` builds it: from the
pages on disk, generated ones included (tests/test_docs.py checks those are what the generator writes). Without
the `docs` extra the test is skipped, saying so; under CI=true (which installs it) it fails instead."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS_EXTRA = ("sphinx", "myst_parser", "furo", "ruamel.yaml")


def missing_docs_extra() -> list[str]:
    return [name for name in DOCS_EXTRA if importlib.util.find_spec(name.split(".")[0]) is None
            or (name == "ruamel.yaml" and importlib.util.find_spec(name) is None)]


@pytest.mark.slow   # starts sphinx-build
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    missing = missing_docs_extra()
    if missing:
        message = f"the docs extra is not installed ({', '.join(missing)} missing): pip install -e '.[docs]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                            str(REPO / "docs"), str(tmp_path / "html")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    for page in ("index", "getting-started/first-run", "how-to/few-shot", "concepts/jacobian-methods",
                 "reference/config/jacobian", "reference/commands", "reference/outputs", "reference/api",
                 "results/index", "results/digits-fewshot"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
    api = (tmp_path / "html" / "reference" / "api.html").read_text()
    assert "GradientMethod" in api and "on_exception" in api and "load_state_dict" in api
    assert (tmp_path / "html" / "searchindex.js").is_file()
