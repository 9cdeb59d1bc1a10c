"""The image's recipe trims packages of what conveyor never loads (image/install.sh
trim): what it keeps must cover what conveyor uses. The step runs here for real, on a
copy of this venv's own botocore models, boto3 and Swagger UI; tests/cluster/test_image.py
creates the AWS clients inside the trimmed image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import botocore
import pygments
import swagger_ui_bundle

from tests.conftest import ROOT

INSTALL = ROOT / "image" / "install.sh"
SRC = ROOT / "src" / "conveyor"


def aws_services_kept() -> set[str]:
    found = re.search(r'^aws_services="([^"]*)"$', INSTALL.read_text(), re.MULTILINE)
    assert found, "aws_services in image/install.sh"
    return set(found.group(1).split())


def trimmed_site(tmp_path: Path) -> Path:
    """What `install.sh trim` works on, from this venv (botocore's models: the kept ones
    and a few others), after the trim."""
    site = tmp_path / "site-packages"
    models = Path(botocore.__file__ or "").parent / "data"
    sample = aws_services_kept() | {"s3", "ec2", "lambda"}
    shutil.copytree(
        models,
        site / "botocore" / "data",
        ignore=lambda folder, names: [
            n for n in names if Path(folder) == models and (models / n).is_dir() and n not in sample
        ],
    )
    for module in (boto3, swagger_ui_bundle, pygments):
        package = Path(module.__file__ or "").parent
        shutil.copytree(package, site / package.name, ignore=shutil.ignore_patterns("*.pyc"))
    subprocess.run(["sh", str(INSTALL), "trim", str(site)], check=True)
    return site


def test_every_aws_api_conveyor_calls_keeps_its_model_and_no_other_does(
    tmp_path: Path,
) -> None:
    called = {
        service
        for module in SRC.rglob("*.py")
        for service in re.findall(r'boto3\.client\(\s*"([a-z0-9-]+)"', module.read_text())
    }
    assert {"sqs", "cloudformation"} <= called  # the gates and ci-privileges
    assert called <= aws_services_kept()
    site = trimmed_site(tmp_path)
    models = {path.name for path in (site / "botocore" / "data").iterdir() if path.is_dir()}
    assert models == aws_services_kept()
    # What botocore reads for any client stays: endpoints, partitions, retry rules.
    for name in ("endpoints.json", "partitions.json", "_retry.json"):
        assert (site / "botocore" / "data" / name).is_file()


def test_the_api_docs_page_loads_only_swagger_files_the_image_keeps(tmp_path: Path) -> None:
    template = (SRC / "web" / "templates" / "api_docs.html").read_text()
    loaded = re.findall(r"/api/docs/assets/([\w.-]+)", template)
    assert {"swagger-ui-bundle.js", "swagger-ui.css"} <= set(loaded)
    bundle = Path(swagger_ui_bundle.swagger_ui_path)
    kept = (
        trimmed_site(tmp_path)
        / "swagger_ui_bundle"
        / bundle.relative_to(Path(swagger_ui_bundle.__file__).parent)
    )
    assert all((kept / name).is_file() for name in loaded)
    assert not list(kept.glob("*.map"))  # what the trim is for


# What rich asks of Pygments: the lexer of a traceback's Python by name and by file
# name (every entry of the map is loaded when guessing), a style; a language whose
# lexer is gone is "not found", which rich shows as plain text.
PYGMENTS_AS_RICH_USES_IT = """
import pygments.lexers as lexers
from pygments.styles import get_style_by_name
from pygments.util import ClassNotFound
print(lexers.get_lexer_by_name("python").name, lexers.get_lexer_for_filename("a.yaml").name)
print(lexers.guess_lexer_for_filename("a.py", "import os").name, len(list(lexers.get_all_lexers())))
get_style_by_name("monokai")
try:
    lexers.get_lexer_by_name("rust")
except ClassNotFound:
    print("rust: plain text")
"""


def test_pygments_keeps_the_lexers_rich_colours_tracebacks_with(tmp_path: Path) -> None:
    site = trimmed_site(tmp_path)
    kept = {path.stem for path in (site / "pygments" / "lexers").glob("*.py")}
    assert kept == {"__init__", "_mapping", "python", "special", "data", "diff", "shell", "configs"}
    shown = subprocess.run(
        [sys.executable, "-S", "-c", PYGMENTS_AS_RICH_USES_IT],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert shown[0] == "Python YAML"
    guessed, known = shown[1].split()
    assert guessed == "Python" and 20 < int(known) < 80  # of ~600 before the trim
    assert shown[2] == "rust: plain text"


# Runs in a fresh interpreter where `cryptography` cannot be imported, as in the image.
WITHOUT_CRYPTOGRAPHY = """
import importlib, pkgutil, sys
import importlib.abc

class NoCryptography(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cryptography":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoCryptography())
import conveyor
from conveyor.sandbox.manager import SandboxError, _generate_pki

for module in pkgutil.walk_packages(conveyor.__path__, "conveyor."):
    # __main__ runs the CLI; certificates.py is the one module that needs cryptography.
    leaf = module.name.rsplit(".", 1)[-1]
    if leaf != "__main__" and module.name != "conveyor.sandbox.certificates":
        importlib.import_module(module.name)
try:
    _generate_pki(__import__("pathlib").Path(sys.argv[1]), cluster_name="x")
except SandboxError as error:
    print(error)
"""


def test_nothing_but_making_a_sandbox_imports_cryptography(tmp_path: Path) -> None:
    """`cryptography` is the sandbox extra (pyproject.toml), left out of the image:
    every other module of conveyor imports without it, and a sandbox asked for without
    it says what to install."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_CRYPTOGRAPHY, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        "a sandbox needs cryptography, which this install leaves out: "
        "pip install 'conveyor[sandbox]'"
    )
    runtime = (ROOT / "requirements" / "runtime.txt").read_text()
    assert "\ncryptography==" not in runtime and "\ncffi==" not in runtime
