"""fxplan: automatic hybrid-parallel training plans for PyTorch models.

See README.md. The public names are re-exported here.
"""

import importlib.util as _util
import os as _os
import sys as _sys

# The folders installed as fxplan's subpackages (pyproject.toml's package-dir).
_MAPPED = {"fxplan.passes": "passes", "fxplan.codegen": "codegen", "fxplan.models": "models"}


class _CheckoutFinder:
    """In a plain checkout (nothing installed) fxplan.passes/.codegen/.models live in the repository's
    top-level folders. This finder maps exactly those three names there, so the checkout imports the
    same files as a wheel or an editable install, and nothing else of the repository root (bench/, a
    second fxplan/) becomes part of the package. It goes first: whichever checkout `fxplan` itself
    was imported from (an editable install's, or another one on PYTHONPATH) supplies its siblings."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        folder = _MAPPED.get(name)
        if folder is None:
            return None
        location = _os.path.join(self.root, folder)
        init = _os.path.join(location, "__init__.py")
        if not _os.path.isfile(init):
            return None
        return _util.spec_from_file_location(name, init, submodule_search_locations=[location])


def _checkout_path() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if _os.path.isdir(_os.path.join(here, "passes")) or not _os.path.isfile(_os.path.join(root, "passes", "__init__.py")):
        return  # a wheel, or fxplan/ copied without its sibling folders
    if not any(isinstance(f, _CheckoutFinder) for f in _sys.meta_path):
        _sys.meta_path.insert(0, _CheckoutFinder(root))


_checkout_path()

from fxplan.errors import (  # noqa: E402
    CheckpointError,
    ClusterError,
    ConstraintError,
    DistributedSetupError,
    FxplanError,
    InfeasiblePlanError,
    ModelError,
    PlanFileError,
    TraceError,
    UnsupportedOpError,
)
from fxplan.cluster import Cluster  # noqa: E402
from fxplan.constraints import Constraints  # noqa: E402
from fxplan.plan import Plan, SolverInfo, Stage, Strategy  # noqa: E402


def compile(*args, **kwargs):  # noqa: A001 - the public name is part of the contract
    from fxplan.api import compile as _compile

    return _compile(*args, **kwargs)


def load_checkpoint(*args, **kwargs):
    from fxplan.api import load_checkpoint as _load

    return _load(*args, **kwargs)


def __getattr__(name):
    if name == "schedules":
        import importlib

        return importlib.import_module("fxplan.schedules")
    raise AttributeError(name)


__all__ = [
    "Cluster", "Constraints", "Plan", "Stage", "Strategy", "SolverInfo", "compile", "load_checkpoint",
    "FxplanError", "TraceError", "UnsupportedOpError", "InfeasiblePlanError", "ClusterError",
    "ConstraintError", "PlanFileError", "DistributedSetupError", "ModelError", "CheckpointError",
]
__version__ = "0.1.0"
