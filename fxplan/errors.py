"""Every user-facing failure is an FxplanError whose message names the problem and the fix."""


class FxplanError(Exception):
    """Base class of every error fxplan raises on purpose."""


class TraceError(FxplanError):
    """The model could not be traced (names the source line / op)."""


class UnsupportedOpError(FxplanError):
    """An op in the graph has no sharding rule and cannot be treated as replicated."""


class InfeasiblePlanError(FxplanError):
    """No plan fits device memory (states the best candidate's need vs what a device has)."""


class ClusterError(FxplanError):
    """Bad cluster description (unknown preset lists the known ones)."""


class ConstraintError(FxplanError):
    """User constraints cannot hold (or the batch does not divide)."""


class PlanFileError(FxplanError):
    """A plan file / JSON is malformed, of another version, or does not match the model."""


class DistributedSetupError(FxplanError):
    """The torchrun environment does not match the plan."""


class ModelError(FxplanError):
    """The model or its example inputs do not fit the contract (forward must return a scalar loss)."""


class CheckpointError(FxplanError):
    """A checkpoint folder is missing, not written by fxplan, or from another model."""
