"""The distribution installs one import root, `imlt`, and works from a wheel outside the repo.

The editable install of the dev venv resolves `imlt.*` to the repository folders, which would
hide a package left out of the wheel; so the slow test builds the wheel, installs it (not
editable) into a fresh venv and uses it from a folder that has its own `components/`,
`pipelines/`, `dags/` and `trainer/` packages, as a user's project may.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("trainer", "components", "pipelines", "dags")


def test_pyproject_lists_every_package_folder() -> None:
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        "imlt." + ".".join(init.parent.relative_to(REPO).parts)
        for root in SOURCE_ROOTS
        for init in (REPO / root).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert set(setuptools_cfg["packages"]) == on_disk
    assert setuptools_cfg["package-dir"] == {f"imlt.{r}": r for r in SOURCE_ROOTS}


USE_INSTALLED = r"""
import json, sys, tempfile
from pathlib import Path
import imlt.trainer, imlt.components.kfp as kfp_components, imlt.components.airflow.operators as ops
from imlt.pipelines.compile import PIPELINES, compile_all
from airflow.dag_processing.dagbag import DagBag
import imlt.dags

assert "/site-packages/" in imlt.trainer.__file__, imlt.trainer.__file__
components = sorted(kfp_components.__all__)
for name in components:
    getattr(kfp_components, name)
with tempfile.TemporaryDirectory() as out:
    compiled = sorted(p.name for p in compile_all(Path(out)))
bag = DagBag(dag_folder=str(Path(imlt.dags.__file__).parent))
print(json.dumps({
    "components": components, "compiled": compiled,
    "dags": sorted(bag.dags), "dag_errors": {k: str(v) for k, v in bag.import_errors.items()},
    "local_shadow": __import__("components").__file__,
}))
"""


@pytest.mark.slow
def test_wheel_installs_only_imlt_and_works_beside_a_users_own_packages(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("imlt-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"imlt"}

    # A fresh venv: the wheel goes in for real; its dependencies are the dev venv's site-packages,
    # appended by a .pth (a plain path entry, so the dev venv's editable finder is not loaded).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dev-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)

    project = tmp_path / "user_project"
    for name in SOURCE_ROOTS:
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"# the user's own {name} package\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON"))}
    env.update({"AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": str(project)})
    proc = subprocess.run([str(py), "-c", USE_INSTALLED], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["local_shadow"] == str(project / "components" / "__init__.py")  # the user's package is theirs
    assert "train" in out["components"] and "evaluate" in out["components"]
    assert out["compiled"] and all(name.endswith(".yaml") for name in out["compiled"])
    assert out["dag_errors"] == {}
    assert {"imlt_retraining", "imlt_evaluation"} <= set(out["dags"])

    imlt_cli = subprocess.run([str(venv / "bin" / "imlt"), "--help"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert imlt_cli.returncode == 0 and "read-data" in imlt_cli.stdout
