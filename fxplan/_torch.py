"""Every private torch API fxplan relies on, and nothing else: on a torch upgrade, check this file.

Each name says what fxplan needs; its body is the private call that provides it today (torch 2.11 to
2.13). Production code reaches torch internals only through here (tests/unit/test_architecture.py
walks every file's syntax tree to keep it so).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode as DispatchMode  # a mode below autograd

# ---------------------------------------------------------------- op identity (graph analyses)
# An aten op in an exported graph is an OpOverload (aten.add.Tensor) or its packet (aten.add).
OpOverload = torch._ops.OpOverload
OpOverloadPacket = torch._ops.OpOverloadPacket


def is_aten_op(target) -> bool:
    return isinstance(target, (OpOverload, OpOverloadPacket))


def op_argument_names(op: OpOverload) -> list[str]:
    """The argument names of an aten op's schema, in call order."""
    return [argument.name for argument in op._schema.arguments]


# ---------------------------------------------------------------- ops seen below autograd (meta checks)


def is_functional_op(op: OpOverload) -> bool:
    """The op neither mutates nor aliases an input and draws no random numbers: its outputs' specs
    follow from its inputs' specs alone."""
    schema = op._schema
    return (not schema.is_mutable and not any(r.alias_info for r in schema.returns)
            and torch.Tag.nondeterministic_seeded not in op.tags)


# ---------------------------------------------------------------- graphs from torch.export


def use_plain_codegen(graph: fx.Graph) -> None:
    """Drop export's pytree calling convention: the graph's forward takes and returns plain values."""
    graph._codegen = fx.graph.CodeGen()


def clear_forward_pre_hooks(module: nn.Module) -> None:
    """Remove every forward pre-hook (export's module checks calls against its pytree spec)."""
    module._forward_pre_hooks.clear()
    module._forward_pre_hooks_with_kwargs.clear()


# ---------------------------------------------------------------- a module's own tensors


def own_parameters(module: nn.Module) -> dict:
    """The module's directly registered parameters, None entries included (not its children's)."""
    return module._parameters


def own_buffers(module: nn.Module) -> dict:
    """The module's directly registered buffers, None entries included (not its children's)."""
    return module._buffers


def own_submodules(module: nn.Module) -> dict:
    return module._modules


def shallow_copy_module(module: nn.Module) -> nn.Module:
    """A copy of `module` that shares its children but has its own parameter/buffer tables, so
    tensors can be replaced on the copy without touching the original."""
    clone = module.__new__(type(module))
    clone.__dict__ = dict(module.__dict__)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def forget_tensor(module: nn.Module, name: str) -> None:
    """Unregister parameter or buffer `name` of `module` (so it can be registered again as either)."""
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)


# ---------------------------------------------------------------- the autograd engine


def will_engine_execute(grad_fn) -> bool:
    """Inside a backward pass: whether the engine will run `grad_fn` (False under autograd.grad for
    nodes it does not need). Raises RuntimeError outside a backward pass."""
    return torch._C._will_engine_execute_node(grad_fn)


def queue_end_of_backward(callback) -> None:
    """Run `callback` once the current backward pass has finished (raises outside a backward)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def outer_saved_tensors_hooks():
    """The (pack, unpack) pair of the innermost `saved_tensors_hooks` active now, or None: a pair
    entered inside it replaces it for autograd, so it hands on the tensors it does not take."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def has_grad_hooks(tensor: torch.Tensor) -> bool:
    """Whether hooks on the leaf expect the engine to deliver its gradient itself."""
    return bool(getattr(tensor, "_backward_hooks", None) or getattr(tensor, "_post_accumulate_grad_hooks", None))


# ---------------------------------------------------------------- torch.distributed.pipelining


def replicated_chunk_spec():
    """The chunk spec that hands every microbatch the whole argument (not split along dim 0)."""
    from torch.distributed.pipelining.microbatch import _Replicate

    return _Replicate()


def pipeline_schedule_runtime(stages, actions: dict, **kwargs):
    """torch's pipelining runtime executing the given per-rank compute actions
    {rank: [(stage, "F" | "I" | "W" | "B", microbatch)]}: `_PipelineScheduleRuntime` loaded with
    `_prepare_schedule_with_comms`, which adds the sends, receives and gradient reductions."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType, _PipelineScheduleRuntime

    runtime = _PipelineScheduleRuntime(stages, **kwargs)
    runtime._prepare_schedule_with_comms(
        {rank: [_Action(stage, _ComputationType.from_str(kind), mb) for stage, kind, mb in ops]
         for rank, ops in actions.items()})
    return runtime


def loaded_compute_actions(schedule, rank: int) -> list[tuple[int, str, int]]:
    """The compute actions (stage, kind, microbatch) torch's runtime will run on `rank`, in order,
    read back from its lowered list (sends, receives and gradient reductions left out)."""
    kinds = {"F", "I", "W", "B"}
    out = []
    for action in schedule.pipeline_order_with_comms[rank]:
        kind = action.computation_type.value
        if kind in kinds:
            out.append((action.stage_index, kind, action.microbatch_index))
    return out


def tensor_version(tensor) -> int:
    """The tensor's in-place version counter (bumped by every in-place op on it)."""
    return tensor._version


def set_group_timeout(timeout, group=None) -> None:
    """A process group's collective timeout, changed after it was made (the default group's if None)."""
    from torch.distributed import distributed_c10d

    distributed_c10d._set_pg_timeout(timeout, group)


def default_store():
    """The default process group's key-value store (torchrun's rendezvous store)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()
