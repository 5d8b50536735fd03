"""Proves what a plain install gives a new user: every third-party package that the package,
the recipes, the tools and the tests import is declared in pyproject.toml, and a command whose
extra is missing says in one line what to install."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra brings tomli
    import tomli as tomllib

OWN = {"salm_megatron", "recipes", "tests", "tools"}
# Installed first on purpose, declared nowhere (see the Makefile): an unpinned torch pulls CUDA.
NOT_DECLARED = {"torch"}
# Import name -> distribution, for what this machine may not have installed (GPU, references).
NOT_INSTALLED = {"transformer_engine": "transformer-engine", "nemo": "nemo-toolkit",
                 "nemo_run": "nemo-run", "yaml": "pyyaml"}  # fmt: skip


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(root: Path) -> dict[str, set[str]]:
    """Distribution -> the dependency lists of pyproject.toml that name it."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lists = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    found: dict[str, set[str]] = {}
    for group, requirements in lists.items():
        for requirement in requirements:
            name = re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]
            found.setdefault(_normal(name), set()).add(group)
    return found


def imported(root: Path, folder: str) -> dict[str, set[str]]:
    """Top-level third-party module -> the files under ``folder`` importing it (lazy imports
    inside functions included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top not in sys.stdlib_module_names and top not in OWN | {"__future__"}:
                    found.setdefault(top, set()).add(str(path.relative_to(root)))
    return found


def undeclared(folder: str, root: Path = REPO) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    lists = declared(root)
    missing = []
    for module, files in sorted(imported(root, folder).items()):
        names = distributions.get(module) or [NOT_INSTALLED.get(module, module)]
        if module not in NOT_DECLARED and not any(_normal(n) in lists for n in names):
            missing.append(f"{module} (distribution {'/'.join(names)}) in {', '.join(files)}")
    return missing


@pytest.mark.parametrize("folder", ["salm_megatron", "recipes", "tools", "tests"])
def test_every_import_is_declared(folder):
    assert undeclared(folder) == [], "declare these in pyproject.toml"


def test_the_check_finds_an_undeclared_import(tmp_path):
    """The check itself: a module importing a package no list names is reported."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "import os\nimport yaml\n\ndef later():\n    import safetensors.torch\n    import lhotse\n"
    )
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["PyYAML>=6"]\n[project.optional-dependencies]\n'
        'test = ["safetensors"]\n'
    )
    assert [line.split(" ")[0] for line in undeclared("pkg", tmp_path)] == ["lhotse"]


def test_recipes_without_nemo_run_say_what_to_install():
    """`python -m recipes` where NeMo-Run is not installed: --help and --list work, launching
    says what to install (nemo_run is made unimportable in that process)."""
    hide = "import sys; sys.modules['nemo_run'] = None; from recipes.__main__ import main; "

    def run(*args):
        code = hide + f"sys.exit(main({list(args)!r}))"
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    assert run("--help").returncode == 0
    listing = run("--list")
    assert listing.returncode == 0 and "salm_tiny" in listing.stdout
    launching = run("--factory", "salm_tiny", "--dryrun")
    assert launching.returncode == 2 and "Traceback" not in launching.stderr
    assert launching.stderr.strip() == (
        "python -m recipes: error: launching a recipe needs NeMo-Run, which is not installed: "
        "pip install -e '.[launch]' in this repository (or `make test`, which does)"
    )
