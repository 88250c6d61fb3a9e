"""The package's shape: imports point down (cli → training / generation / evaluation → models / data →
utils, config), inference never imports training, every sub-package is installed, and ruff is clean."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (the dev extra installs it)
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

# What each layer may import from movq (besides itself). Inference (models, generation, evaluation) and
# data never reach training or the command lines.
ALLOWED = {
    "config": {"utils"},
    "utils": set(),
    "kernels": set(),
    "models": {"config", "utils", "kernels"},
    "data": {"config", "utils"},
    "generation": {"config", "utils", "models", "data"},
    "evaluation": {"config", "utils", "models", "data"},
    "interop": {"config", "utils", "models"},
    "training": {"config", "utils", "models", "data", "generation", "evaluation"},
    "cli": {"config", "utils", "models", "data", "generation", "evaluation", "training", "interop", "cli"},
}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "movq"


def _movq_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("movq"):
            found.add(node.module if node.module != "movq" else f"movq.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("movq."))
    return found


def _files():
    for path in sorted((ROOT / "movq").rglob("*.py")):
        rel = path.relative_to(ROOT / "movq")
        layer = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "movq"
        yield layer, path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "kernels", path


def test_imports_point_down():
    wrong = []
    for layer, path in _files():
        if layer == "movq":
            continue
        for module in _movq_imports(path):
            target = _layer(module)
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_sampling_and_tokenizing_import_nothing_from_training():
    code = ("import sys, movq.cli.sample, movq.cli.tokenize, movq.cli.fid, movq.generation.sampler; "
            "print(sorted(m for m in sys.modules if m.startswith('movq.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_sub_package_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"movq"} | {f"movq.{p.parent.name}" for p in (ROOT / "movq").glob("*/__init__.py")} | {"movq.kernels"}
    assert listed == found


def test_tools_are_thin_entry_points():
    """Library logic lives in movq/; a tool only calls its main (the benchmarks are tools of their own)."""
    for path in sorted((ROOT / "tools").glob("*.py")):
        if path.name.startswith(("bench_", "_bench", "compare_", "ablate")):  # benchmarks and experiments
            continue
        assert len(path.read_text().splitlines()) <= 10, f"{path.name} holds more than an entry point"


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    out = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
