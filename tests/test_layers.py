"""The layer rules of docs/architecture.md are import-linter contracts (pyproject.toml) that really bite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    if not Path(LINT_IMPORTS).exists():
        pytest.skip('import-linter is not installed (pip install -e ".[dev]")')
    copy = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "pue", copy / "pue", ignore=shutil.ignore_patterns("data", "__pycache__"))
    (copy / "pue" / "data").mkdir()
    shutil.copy(ROOT / "pue" / "data" / "__init__.py", copy / "pue" / "data" / "__init__.py")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_the_tree_keeps_every_contract(tree):
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("runtime/embedder.py", "import torch", "The lean core"),
        ("runtime/embedder.py", "import pue.calibration.int8", "The lean core"),
        ("export/reference.py", "import pue.cli.common", "Nothing imports the command-line layer"),
        ("calibration/int8.py", "import pue.export.checkpoint", "Calibration runs without torch"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tree, tmp_path, module, line, contract):
    broken = tmp_path / "tree"
    shutil.copytree(tree, broken)
    target = broken / "pue" / module
    target.write_text(target.read_text() + f"\n\ndef _smuggled():\n    {line}\n")
    result = lint_imports(broken)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and contract in " ".join(result.stdout.split()), result.stdout
