"""Packaging: dependencies are ranges, the optional packages are extras the core runs without (with a clear
error naming the extra where one is needed), Python 3.10-3.13, a typed package, and a wheel that holds
every sub-package, the kernels, py.typed and the console scripts."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS_ONLY = ("wandb", "tensorboard", "scikit-image", "scikit-learn")


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_dependencies_are_ranges_and_the_optional_packages_extras():
    deps = PROJECT["dependencies"]
    assert not [d for d in deps if "==" in d.split(";")[0]], "a pinned dependency would replace the user's own build"
    assert not [d for d in deps if _name(d) in EXTRAS_ONLY]
    extras = PROJECT["optional-dependencies"]
    assert {_name(r) for r in extras["builtin"]} == {"scikit-image", "scikit-learn"}
    assert [_name(r) for r in extras["wandb"]] == ["wandb"] and [_name(r) for r in extras["tensorboard"]] == [
        "tensorboard"]
    # tools/setup_env.sh installs .[dev]: what the main job and the tests need
    assert any(r.startswith("movq[") and {"builtin", "trackers"} <= set(r[5:-1].split(",")) for r in extras["dev"])
    assert "'.[dev]'" in (ROOT / "tools" / "setup_env.sh").read_text()


def test_python_versions_and_typing():
    assert PROJECT["requires-python"] == ">=3.10"
    versions = {c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if c.startswith("Programming Language :: Python :: 3.")}
    assert versions == {"3.10", "3.11", "3.12", "3.13"}
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert (ROOT / "movq" / "py.typed").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["movq"]


def test_the_core_imports_without_the_extras():
    """Every library module and tool imports with wandb, tensorboard, scikit-image and scikit-learn absent."""
    code = ("import sys\n"
            "for name in ('wandb', 'tensorboard', 'skimage', 'sklearn'):\n"
            "    sys.modules[name] = None  # import fails as for a package that is not installed\n"
            "import movq, movq.kernels, movq.cli.fid, movq.cli.sample, movq.cli.train, movq.cli.convert, "
            "movq.cli.tokenize, movq.cli.make_shards, movq.training.tokenizer, movq.training.prior, "
            "movq.interop.export, movq.evaluation.adm\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.fixture
def without(monkeypatch):
    """``without("skimage", ...)``: find_spec says these packages are not installed."""
    real = importlib.util.find_spec

    def hide(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    return hide


def test_builtin_dataset_names_its_extra(tmp_path, without, capsys):
    from movq.config import DataConfig
    from movq.data.builtin import builtin_dataset

    cfg = DataConfig(image_size=16, cache_dir=str(tmp_path), builtin_train_size=2, builtin_val_size=1)
    built = builtin_dataset(cfg)  # with the packages: built once into the cache
    without("skimage")
    assert builtin_dataset(cfg) == built  # a cached copy reads without them
    other = DataConfig(image_size=16, cache_dir=str(tmp_path / "fresh"), builtin_train_size=2, builtin_val_size=1)
    with pytest.raises(ModuleNotFoundError, match=r"scikit-image is not installed: pip install 'movq\[builtin\]'"):
        builtin_dataset(other)
    # through the trainer's command line: one line, exit status 2
    from movq.cli.train import main_tokenizer

    rc = main_tokenizer(["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.cache_dir={tmp_path / 'fresh'}",
                         f"train.run_dir={tmp_path / 'run'}", "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: data.source=builtin") and "movq[builtin]" in err[-1]


def test_a_missing_tracker_names_its_extra(tmp_path, without, capsys):
    from movq.cli.train import main_tokenizer

    without("wandb")
    rc = main_tokenizer(["--config", str(ROOT / "configs" / "tiny.yaml"), "train.trackers=[wandb]",
                         f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == "error: train.trackers names wandb, which is not installed: pip install 'movq[wandb]'"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_wheel_holds_the_package(tmp_path):
    """A non-editable build: every sub-package, the kernels as movq.kernels, py.typed, the console scripts
    and the metadata (ranges, extras, Python >= 3.10)."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    for name in ("movq", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("movq-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "movq").glob("*/__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} | {"movq/__init__.py", "movq/py.typed", "movq/kernels/vq.py",
                                                       "movq/kernels/__init__.py"} <= names
    assert not any(n.startswith(("kernels/", "tests/", "tools/")) for n in names)
    assert "Requires-Python: >=3.10" in meta and "Requires-Dist: torch>=2.4" in meta
    assert {"builtin", "wandb", "tensorboard", "trackers", "bench", "dev"} <= set(re.findall(r"Provides-Extra: (\S+)", meta))
    assert re.search(r"Requires-Dist: wandb>=[\d.]+; extra == \"wandb\"", meta)
    assert "movq-fid = movq.cli.fid:main" in scripts and "movq-convert = movq.cli.convert:main" in scripts
