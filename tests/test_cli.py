"""The command line's light commands (``segment`` runs in subprocesses in the flow tests)."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from segflow.cli import app
from segflow.models import available_models
from tests.conftest import REPO_ROOT


def test_models_lists_the_registry_as_a_table_and_as_json():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert {entry["name"] for entry in listed} == {info.name for info in available_models()}
    assert {"deeplabv3_resnet50", "maskrcnn_resnet50_fpn"} <= {entry["name"] for entry in listed}
    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0 and "lraspp_mobilenet_v3_large" in table.output


def test_the_library_imports_neither_ray_nor_prefect():
    modules = ["segflow." + p.stem for p in (REPO_ROOT / "segflow").glob("*.py")]
    modules += ["segflow.models", "segflow.metrics.semantic", "segflow.metrics.instance"]
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {sorted(modules)!r}]; "
        "print(sorted({'ray', 'prefect'} & set(sys.modules)))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert output.stdout.strip() == "[]"


def test_the_cli_starts_without_torch():
    code = "import sys, segflow.cli; print('torch' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert output.stdout.strip() == "False"
