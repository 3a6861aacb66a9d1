"""Saved-tensor hooks that nest: a `saved_tensors_hooks` pair entered inside another replaces it for
autograd, so the runtime's pairs (FSDP's handles, sequence parallelism's shards) hand every tensor
they do not take to the pair that was active when the stage's forward began (another of ours, or a
user's: offloading, a measurement), and unpack it through that pair again."""

from __future__ import annotations

import torch

from fxplan._torch import outer_saved_tensors_hooks


class Outer:
    """A tensor packed by the enclosing pair; `unpack` gives it back through that pair."""

    __slots__ = ("_unpack", "_packed")

    def __init__(self, unpack, packed):
        self._unpack, self._packed = unpack, packed

    def unpack(self):
        return self._unpack(self._packed)


def enclosing():
    """The pair active now (call before entering our own), or None."""
    return outer_saved_tensors_hooks()


def pass_on(outer, x):
    """`x` packed by the enclosing pair (as it is when there is none)."""
    return Outer(outer[1], outer[0](x)) if outer is not None else x


def take_back(saved):
    """What `pass_on` packed, unpacked; anything else as it is."""
    return saved.unpack() if isinstance(saved, Outer) else saved


class SavedDuringForward:
    """Base of a stage's saved-tensor policy for gathered tensors: while `module`'s forward runs,
    a saved tensor that is a view of a live gathered tensor (`self.live`: storage pointer ->
    (weakref of the gathered tensor, *what the subclass keeps)) is handed to `self._save`, every
    other one to the pair this one encloses (`self.outer()`). Subclasses set their state up in
    `forward_began`, drop it in `forward_ended`, and give `_unpack`."""

    def __init__(self, module, exit_first: bool = False):
        self.live: dict[int, tuple] = getattr(self, "live", {})  # a subclass may have filled it
        self._hooks: list = []
        self._outers: list = []
        module.register_forward_pre_hook(self._enter)
        # exit_first: leave before policies installed earlier (the hooks stack pops in order)
        module.register_forward_hook(self._exit, always_call=True, prepend=exit_first)

    def outer(self):
        return self._outers[-1] if self._outers else None

    def forward_began(self) -> None:
        pass

    def _save(self, x: torch.Tensor, full: torch.Tensor, entry: tuple):
        raise NotImplementedError

    def _pack(self, x: torch.Tensor):
        entry = self.live.get(x.untyped_storage().data_ptr()) if self.live and x.device.type != "meta" else None
        full = entry[0]() if entry is not None else None
        if full is None or full.dtype != x.dtype:
            return pass_on(self.outer(), x)
        return self._save(x, full, entry)

    def forward_ended(self) -> None:
        pass

    def _enter(self, module, args) -> None:
        self.forward_began()
        self._outers.append(enclosing())
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        self._hooks.append(hooks)

    def _exit(self, module, args, output) -> None:
        self._hooks.pop().__exit__(None, None, None)
        self._outers.pop()
        self.forward_ended()
