"""A wheel (``pip install .``, not editable) carries the shipped model and the demo's sample, and the
installed package finds them (``resources.py``); where they are missing the error says where it looked.

The wheel is built from a copy of the files it needs, with the setuptools of the test's own environment
(no download), and installed into a fresh virtual environment without site packages: only
``resources.py``, which needs the standard library alone, is imported there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from CTtoMRISynthesisLib import resources
from CTtoMRISynthesisLib.demo import SAMPLE_FILES, sample_paths
from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.weights import SHIPPED_NAME, checksum_path, default_weights_path, read_config

REPO = Path(__file__).resolve().parents[1]
#: What the wheel is built from: the package, the metadata's files and the shipped data.
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "CTtoMRISynthesis/CTtoMRISynthesisLib",
           "model_weights/" + SHIPPED_NAME, "model_weights/" + SHIPPED_NAME + ".sha256", "model_weights/README.md",
           "CTtoMRISynthesis/Resources/SampleData"]


def _setuptools_builds_this() -> bool:
    """pyproject's licence expression (PEP 639) needs setuptools >= 77 to build without downloading one."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not _setuptools_builds_this():
        pytest.skip("this environment has no setuptools >= 77 to build the wheel offline (pip install 'setuptools>=77')")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, target)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (built,) = out.glob("*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_the_model_and_the_sample_where_resources_looks(wheel):
    with zipfile.ZipFile(wheel) as zf:
        data = {n.split(".data/data/", 1)[1]: zf.getinfo(n).file_size for n in zf.namelist() if ".data/data/" in n}
    share = resources.SHARE.as_posix()
    expected = [f"{share}/model_weights/{SHIPPED_NAME}", f"{share}/model_weights/{SHIPPED_NAME}.sha256"]
    expected += [f"{share}/SampleData/{name}" for name in SAMPLE_FILES.values()]
    for name in expected:
        assert name in data, f"{name} missing from the wheel's data files: {sorted(data)}"
    assert data[f"{share}/model_weights/{SHIPPED_NAME}"] == (REPO / "model_weights" / SHIPPED_NAME).stat().st_size


@pytest.mark.slow
def test_installed_wheel_finds_its_model_and_sample(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # its pip comes from ensurepip, offline
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    _pip_install(python, wheel)
    model, sample, module = _installed_finds(python, tmp_path)
    assert venv.resolve() in module.resolve().parents, module
    assert model.is_file() and venv.resolve() in model.resolve().parents, model
    assert model.read_bytes() == (REPO / "model_weights" / SHIPPED_NAME).read_bytes()
    assert (sample / "ct.nrrd").is_file() and venv.resolve() in sample.resolve().parents, sample


@pytest.mark.slow
def test_a_wheel_installed_under_another_prefix_finds_its_data_there(wheel, tmp_path):
    """pip's data folder is not always sys.prefix (Debian's system Python installs to /usr/local, pip --prefix
    anywhere): the installation's own RECORD says where its share/ctmri went."""
    venv, prefix = tmp_path / "venv", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    _pip_install(python, wheel, "--prefix", str(prefix))
    (site_packages,) = prefix.glob("lib/python3*/site-packages")
    model, sample, module = _installed_finds(python, tmp_path, pythonpath=site_packages)
    assert prefix.resolve() in module.resolve().parents, module
    assert model.is_file() and prefix.resolve() in model.resolve().parents, model
    assert (sample / "ct.nrrd").is_file() and prefix.resolve() in sample.resolve().parents, sample


def _pip_install(python: Path, wheel: Path, *extra: str) -> None:
    """Install ``wheel`` with ``python``'s pip, offline, unaffected by the test run's own PYTHONPATH and pip
    settings (an egg-info of the checkout on PYTHONPATH would make pip think the package is installed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed",
                    *extra, str(wheel)], check=True, capture_output=True, text=True, env=env)


def _installed_finds(python: Path, cwd: Path, pythonpath: Path | None = None) -> tuple:
    """(model, sample folder, resources module file) as the installed package finds them, run outside the
    repository so that only the installed copy can be imported."""
    probe = ("import json; from CTtoMRISynthesisLib import resources as r; "
             f"print(json.dumps([str(r.first_present(r.model_candidates({SHIPPED_NAME!r}))), "
             f"str(r.first_present(r.sample_candidates(), {tuple(SAMPLE_FILES.values())!r})), r.__file__]))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1", **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    done = subprocess.run([str(python), "-c", probe], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return tuple(Path(p) for p in json.loads(done.stdout))


def _installed_without_data(monkeypatch, tmp_path: Path) -> Path:
    """The layout of `pip install .` from before the data files: a package in site-packages, nothing shared."""
    prefix = tmp_path / "env"
    package = prefix / "lib" / "site-packages" / "CTtoMRISynthesisLib"
    package.mkdir(parents=True)
    monkeypatch.setattr(resources, "PACKAGE_DIR", package)
    monkeypatch.setattr(resources, "data_prefixes", lambda: [prefix])
    monkeypatch.delenv("CTMRI_WEIGHTS", raising=False)
    return prefix


def test_missing_shipped_model_says_it_is_not_installed_and_where_it_looked(monkeypatch, tmp_path):
    prefix = _installed_without_data(monkeypatch, tmp_path)
    path = default_weights_path()
    with pytest.raises(CTMRIError) as err:
        read_config(path)  # what the Slicer module reads first; load_model checks the file the same way
    message = str(err.value)
    assert "the shipped model is not installed here" in message
    assert str(prefix / "share" / "ctmri" / "model_weights" / SHIPPED_NAME) in message
    assert "pip install" in message and "--weights" in message
    assert "leave it out to use the shipped model" not in message  # the advice a user's --weights path gets


def test_a_users_missing_weights_file_keeps_its_own_message(tmp_path):
    with pytest.raises(CTMRIError, match="weights file not found: .*gone.safetensors; pass --weights"):
        read_config(tmp_path / "gone.safetensors")


def test_shipped_files_found_under_the_prefix_share_folder(monkeypatch, tmp_path):
    prefix = _installed_without_data(monkeypatch, tmp_path)
    models = prefix / "share" / "ctmri" / "model_weights"
    models.mkdir(parents=True)
    shutil.copy2(REPO / "model_weights" / SHIPPED_NAME, models)
    shutil.copy2(checksum_path(REPO / "model_weights" / SHIPPED_NAME), models)
    assert default_weights_path() == models / SHIPPED_NAME
    assert read_config(default_weights_path())["model"]["members"] == 4
    sample = prefix / "share" / "ctmri" / "SampleData"
    assert resources.first_present(resources.sample_candidates(), tuple(SAMPLE_FILES.values())) != sample
    shutil.copytree(REPO / "CTtoMRISynthesis" / "Resources" / "SampleData", sample)
    assert resources.first_present(resources.sample_candidates(), tuple(SAMPLE_FILES.values())) == sample
    assert sample_paths(sample)["ct"] == sample / "ct.nrrd"


def test_a_missing_model_named_by_ctmri_weights_says_so(monkeypatch, tmp_path):
    """With CTMRI_WEIGHTS set, leaving --weights out takes that file, not the shipped model: the advice says so."""
    monkeypatch.setenv("CTMRI_WEIGHTS", str(tmp_path / "gone.safetensors"))
    with pytest.raises(CTMRIError, match="named by CTMRI_WEIGHTS; set it to an existing .safetensors file, or unset"):
        read_config(default_weights_path())


def test_the_demo_without_a_shipped_model_offers_only_what_it_takes(monkeypatch, tmp_path):
    """The demo has no --weights: its advice names where the model was looked for and CTMRI_WEIGHTS only."""
    from CTtoMRISynthesisLib import demo

    _installed_without_data(monkeypatch, tmp_path)
    with pytest.raises(CTMRIError) as err:
        demo._weights_or_error()
    message = str(err.value)
    assert "the shipped model is not installed here" in message and "set CTMRI_WEIGHTS to a model file" in message
    assert "--weights" not in message
