"""Import names are unambiguous: a user's own top-level `models` / `passes` package never shadows ours,
and a wheel built from the tree imports exactly the modules of the checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = {"fxplan": "fxplan", "fxplan.passes": "passes", "fxplan.codegen": "codegen", "fxplan.models": "models"}

# Run in a child process: import fxplan's subpackages and the top-level `models`, report file paths.
PROBE = """
import json, sys
import fxplan, fxplan.models, fxplan.passes, fxplan.codegen
out = {name: sys.modules[name].__file__ for name in ("fxplan", "fxplan.models", "fxplan.passes", "fxplan.codegen")}
out["has_build"] = callable(getattr(fxplan.models, "build", None))
out["leaks"] = []  # repository folders that are not fxplan's must not import as part of it
for name in ("fxplan.bench", "fxplan.fxplan", "fxplan.tests"):
    try:
        __import__(name)
        out["leaks"].append(name)
    except ImportError:
        pass
try:
    import models
    out["models"] = getattr(models, "DECOY", None)
except ImportError:
    out["models"] = None
print(json.dumps(out))
"""


def _probe(pythonpath: list[Path], cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.timeout(120)
def test_decoy_top_level_packages_do_not_shadow_fxplan(tmp_path):
    decoys = tmp_path / "decoys"
    for name in ("models", "passes", "codegen"):
        (decoys / name).mkdir(parents=True)
        (decoys / name / "__init__.py").write_text(f"DECOY = 'decoy {name}'\n")
    result = _probe([decoys, ROOT], cwd=tmp_path)
    assert result["models"] == "decoy models"  # the user's package wins the plain name ...
    assert result["has_build"]  # ... and fxplan still gets its own presets
    assert result["leaks"] == []
    for name, folder in SUBPACKAGES.items():
        assert _inside(result[name], ROOT / folder), (name, result[name])


def _module_files(package_dir: Path) -> set[str]:
    return {p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_imports_the_same_modules_as_the_checkout(tmp_path):
    # Build from a copy of the tree: setuptools writes build/ and *.egg-info next to the sources.
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in SUBPACKAGES.values():
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(tree)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("fxplan-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)

    # cwd and PYTHONPATH hold no checkout: only the unpacked wheel can answer `import fxplan`.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _probe([site], cwd=elsewhere)
    assert result["has_build"] and result["models"] is None and result["leaks"] == []
    for name in SUBPACKAGES:
        assert _inside(result[name], site / name.replace(".", "/")), (name, result[name])
    mapped = {name.split(".")[1] for name in SUBPACKAGES if "." in name}
    for name, folder in SUBPACKAGES.items():
        shipped = _module_files(site / name.replace(".", "/"))
        if name == "fxplan":  # its mapped subpackages are compared on their own
            shipped = {path for path in shipped if path.split("/")[0] not in mapped}
        assert shipped == _module_files(tree / folder), f"{name}: wheel and checkout differ (pyproject packages?)"


@pytest.mark.timeout(120)
def test_this_interpreters_install_imports_fxplan_and_nothing_else_of_the_repository(tmp_path):
    # no PYTHONPATH and a neutral cwd: whatever install this interpreter has (the editable one of
    # ./dev, or a wheel) answers, and it maps only fxplan's own folders
    result = _probe([], cwd=tmp_path)
    assert result["has_build"] and result["leaks"] == [] and result["models"] is None
