"""fxplan: automatic hybrid-parallel training plans for PyTorch models.

See README.md and API.md. The public names are re-exported here.
"""

import os as _os


def _checkout_path() -> None:
    # In a plain checkout (no install) the subpackages fxplan.passes / .codegen / .models live in the
    # repository's top-level folders passes/, codegen/, models/. Installed (wheel or editable),
    # setuptools' package-dir maps them; here we add the repository root to this package's search
    # path so the same import names resolve to the same files.
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if not _os.path.isdir(_os.path.join(here, "passes")) and _os.path.isfile(
        _os.path.join(root, "passes", "__init__.py")
    ):
        if root not in __path__:
            __path__.append(root)


_checkout_path()

from fxplan.errors import (  # noqa: E402
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


def compile(*args, **kwargs):  # noqa: A001 - the public name is fixed by API.md
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
    "ConstraintError", "PlanFileError", "DistributedSetupError", "ModelError",
]
__version__ = "0.1.0"
