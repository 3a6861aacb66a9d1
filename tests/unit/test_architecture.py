"""The layout ARCHITECTURE.md describes, checked from the code's own syntax trees: which folder may
import which, no import cycles, short files, private torch APIs only through fxplan/_torch.py, and a
map that names every production file."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# source folder -> the import name it is installed under (pyproject.toml's package-dir)
PACKAGES = {"fxplan": "fxplan", "passes": "fxplan.passes", "codegen": "fxplan.codegen", "models": "fxplan.models"}
MAX_LINES = 450

LEAVES = {"fxplan.plan", "fxplan.plan_schema", "fxplan.cluster", "fxplan.calibration", "fxplan.constraints", "fxplan.errors",
          "fxplan._torch"}
# what codegen may read of passes: the values passed between passes and the redistribution rules
PASSES_IR = {"fxplan.passes.ir", "fxplan.passes.sharding.redistribute"}
# Cluster.local() is a Cluster constructor by the public contract and measures this host when called;
# the measurement (runtime/probe.py) is the one thing a leaf value reaches upward for.
LEAF_EXCEPTIONS = {("fxplan.cluster", "fxplan.runtime.probe")}
ALLOWED = {  # folder -> the folders it may import, besides the leaves and itself
    "front": {"passes", "codegen", "runtime", "models", "schedules"},
    "runtime": {"codegen", "schedules"},
    "codegen": {"passes-ir"},
    "passes": {"schedules"},
    "schedules": set(),  # pipeline action lists and their simulator: plain Python, no torch
    "models": set(),
    "leaf": set(),
}


def production_files() -> dict[str, Path]:
    """import name -> file, for every module fxplan installs."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if folder == "fxplan" and parts and parts[0] in ("passes", "codegen", "models"):
                continue  # never the case in a checkout; a wheel's layout
            out[".".join([package] + parts)] = path
    return out


MODULES = production_files()


def folder_of(module: str) -> str:
    if module in LEAVES:
        return "leaf"
    if module in PASSES_IR:
        return "passes-ir"
    for prefix, folder in (("fxplan.runtime", "runtime"), ("fxplan.passes", "passes"), ("fxplan.schedules", "schedules"),
                           ("fxplan.codegen", "codegen"), ("fxplan.models", "models")):
        if module == prefix or module.startswith(prefix + "."):
            return folder
    return "front"  # fxplan's own files: api, planner, cli, report, demo, the package itself


def imports_of(module: str, path: Path) -> set[str]:
    """fxplan modules `module` imports anywhere in its file (lazy imports inside functions too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import fxplan.passes.ir` names fxplan.passes.ir
                name = name.rpartition(".")[0]
            if name.startswith("fxplan") and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module, path) for module, path in MODULES.items()}


def test_folders_import_only_the_allowed_folders():
    bad = []
    for module, targets in GRAPH.items():
        source = folder_of(module)
        source = "passes" if source == "passes-ir" else source
        for target in sorted(targets):
            dest = folder_of(target)
            if dest == "leaf" or (module, target) in LEAF_EXCEPTIONS:
                continue
            if dest == source or (dest == "passes-ir" and source == "passes"):
                continue
            if dest in ALLOWED[source] or (dest == "passes-ir" and "passes" in ALLOWED[source]):
                continue
            bad.append(f"{module} ({source}) imports {target} ({dest})")
    assert not bad, "\n".join(bad)


def test_the_edge_check_sees_real_imports():
    # the walk must find lazy imports inside functions and resolve `from package import module`
    assert "fxplan.passes.trace" in GRAPH["fxplan.planner"] or any(
        t.startswith("fxplan.passes") for t in GRAPH["fxplan.planner"])
    assert "fxplan.runtime.runner" in GRAPH["fxplan.api"]
    assert "fxplan.passes.ir" in GRAPH["fxplan.codegen.emit"]


def test_no_import_cycles_between_files():
    # Tarjan's strongly connected components over every import, lazy ones included
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    # a package's __init__ re-exporting its own modules is not a cycle between files
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not cycles, cycles


def test_the_solver_imports_no_torch():
    for module, targets in GRAPH.items():
        if module.startswith("fxplan.schedules"):  # the solver reads schedules' lists: no torch there either
            tree = ast.parse(MODULES[module].read_text())
            roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
            roots |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert "torch" not in roots, module
        if module.startswith("fxplan.passes.solve"):
            tree = ast.parse(MODULES[module].read_text())
            roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
            roots |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert "torch" not in roots, module
            assert all(t.startswith(("fxplan.passes.solve", "fxplan.schedules")) or t in LEAVES - {"fxplan._torch"}
                       for t in targets), (
                module, targets)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_production_files_are_short(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


# torch internals reached through an object rather than the torch namespace
TORCH_INTERNALS = {"_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
                   "_forward_hooks", "_backward_hooks", "_post_accumulate_grad_hooks", "_codegen", "_graph",
                   "_execution_engine", "_version", "_base", "_cdata", "_C", "_ops", "_qualified_op_name",
                   "_schema", "_overloadpacket"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_torch_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    torch_names = set()  # local names bound to torch or anything imported from it
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    if any(_private(part) for part in alias.name.split(".")):
                        uses.append(f"line {node.lineno}: import {alias.name}")
                    torch_names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch" and not node.level:
            for alias in node.names:
                if any(_private(part) for part in node.module.split(".")) or _private(alias.name):
                    uses.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                torch_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if node.attr in TORCH_INTERNALS or (isinstance(root, ast.Name) and root.id in torch_names):
                uses.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in TORCH_INTERNALS):
            uses.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return uses


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "fxplan._torch"))
def test_private_torch_apis_only_through_fxplan_torch(module):
    uses = private_torch_uses(MODULES[module])
    assert not uses, f"{MODULES[module].relative_to(ROOT)} uses private torch APIs (move them to fxplan/_torch.py): {uses}"


def test_the_private_api_check_catches_what_it_must(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nimport torch.distributed as dist\nfrom torch.distributed.pipelining.microbatch "
                      "import _Replicate\nfrom torch import nn\n"
                      "a = torch._ops.OpOverload\nb = dist._functional\nc = module._parameters\n"
                      "d = getattr(t, '_backward_hooks', None)\ne = torch.__version__\nf = nn.Module\n")
    found = "\n".join(private_torch_uses(sample))
    for expected in ("_Replicate", "._ops", "._functional", "._parameters", "'_backward_hooks'"):
        assert expected in found, (expected, found)
    assert "__version__" not in found and ".Module" not in found


ARCHITECTURE = ROOT / "ARCHITECTURE.md"
_PATH = re.compile(r"`((?:fxplan|passes|codegen|models|tests|bench)/[\w/.-]*\.py)`")


def test_architecture_md_names_every_production_file_and_only_real_ones():
    text = ARCHITECTURE.read_text()
    named = set(_PATH.findall(text))
    missing_files = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing_files, f"ARCHITECTURE.md names files that do not exist: {missing_files}"
    production = {path.relative_to(ROOT).as_posix() for path in MODULES.values()
                  if path.name != "__init__.py" or len(path.read_text().splitlines()) > 3}
    unnamed = sorted(production - named)
    assert not unnamed, f"ARCHITECTURE.md does not name: {unnamed}"


def test_no_test_folder_is_one_pytest_skips(request):
    # pytest does not recurse into folders matching norecursedirs (dist, build, ...): a tier named
    # like that would silently never run
    import fnmatch

    patterns = request.config.getini("norecursedirs")
    folders = {p.parent for p in (ROOT / "tests").rglob("test_*.py")}
    skipped = sorted(str(f.relative_to(ROOT)) for f in folders
                     for part in f.relative_to(ROOT).parts if any(fnmatch.fnmatch(part, pat) for pat in patterns))
    assert not skipped, f"pytest would skip these test folders: {skipped}"
