"""The import layers (attention < models < jobs < command line; mini a leaf) hold, and the check bites."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(config: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(LINT.parent), "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [str(LINT), "--config", str(config), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_the_source_keeps_its_layers(tmp_path):
    result = lint(ROOT / "pyproject.toml", ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_job_importing_the_command_line_is_caught(tmp_path):
    tree = tmp_path / "src"
    shutil.copytree(
        ROOT / "src" / "cleardit", tree / "cleardit", ignore=shutil.ignore_patterns("weights", "*.pyc")
    )
    highres = tree / "cleardit" / "pipelines" / "highres.py"
    highres.write_text(highres.read_text() + "\nfrom ..parallel import launch  # noqa\n")
    result = lint(ROOT / "pyproject.toml", tree)
    assert result.returncode != 0
    assert "cleardit.pipelines is not allowed to import cleardit.parallel" in result.stdout
