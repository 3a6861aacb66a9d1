"""Time of moving one tensor between two layouts (dp, tp, placement) of adjacent layers: the
resharding steps codegen emits (`passes.sharding.redistribute.layout_steps`) and the point-to-point
transfer across a stage boundary, priced on the stage mesh's groups for one microbatch."""

from __future__ import annotations

from fxplan.cluster import Cluster
from fxplan.passes.cost import collectives as cc
from fxplan.passes.cost.mesh import StageMesh
from fxplan.passes.cost.spec_facts import is_float, precision_ratio
from fxplan.passes.ir import Shard, TensorMeta
from fxplan.passes.sharding.redistribute import Layout, layout_steps


class TensorPricer:
    """Time (one microbatch, fwd + bwd) of moving one tensor between layouts (dp, tp, placement).

    `batch_scale` = planned global batch / traced batch: tensor metas are the traced batch's.
    """

    def __init__(self, cluster: Cluster, mesh: StageMesh, batch_scale: float):
        self.cluster = cluster
        self.mesh = mesh
        self.batch_scale = batch_scale
        self._cache: dict[tuple, float] = {}

    def local_bytes(self, meta: TensorMeta, layout, c: int) -> float:
        """Bytes one device holds of `meta` for one microbatch under `layout`."""
        dp, tp, placement = layout
        nbytes = meta.nbytes * precision_ratio(self.cluster, meta)
        if meta.batch_dim is not None:
            nbytes *= self.batch_scale / (c * dp)
        if isinstance(placement, Shard):
            nbytes /= tp
        return nbytes

    def send(self, meta: TensorMeta, layout, n_s: int, c: int) -> float:
        """p2p of the local tensor across a stage boundary: activation forward, gradient backward."""
        key = ("send", meta, layout, n_s, c)
        if key not in self._cache:
            src, dst = self.mesh.boundary_pair(n_s)
            t = cc.p2p_time(self.cluster, src, dst, self.local_bytes(meta, layout, c))
            self._cache[key] = t * (2 if is_float(meta) else 1)
        return self._cache[key]

    def reshard(self, meta: TensorMeta, out, inn, n_s: int, c: int) -> float:
        """Conversion from the src layer's output layout to what the dst layer wants: the steps of
        `redistribute.layout_steps` (the same ones codegen emits), priced on their groups."""
        if out == inn:
            return 0.0
        key = ("reshard", meta, out, inn, n_s, c)
        if key not in self._cache:
            src, dst = Layout(*out), Layout(*inn)
            grad = is_float(meta)
            total = 0.0
            for step in layout_steps(src, dst, meta, grad):
                if step.fwd:
                    total += self._step_time(step.fwd, step, step.group, src.tp, meta, step.fwd_bytes, n_s, c)
                if step.bwd and grad:
                    fraction = 1.0 if step.kind == "dp_grad" else step.bwd_bytes
                    total += self._step_time(step.bwd, step, step.bwd_group or step.group, dst.tp, meta,
                                             fraction, n_s, c, batched=step.kind != "dp_grad")
            self._cache[key] = total
        return self._cache[key]

    def _step_time(self, kind: str, step, group: int, tp: int, meta: TensorMeta, fraction: float, n_s: int,
                   c: int, batched: bool = True) -> float:
        """One collective of a layout step. Buffer = fraction of the global tensor (see
        redistribute.steps_comms), one microbatch of it. Groups: tp steps on `group` adjacent ranks;
        dp steps on `group` ranks `tp` apart (forward ones in the source mesh, backward ones in the
        destination mesh, hence the caller's `tp`)."""
        if group <= 1 or fraction <= 0:
            return 0.0
        nbytes = meta.nbytes * fraction * precision_ratio(self.cluster, meta)
        if batched and meta.batch_dim is not None:
            nbytes *= self.batch_scale / c
        stride = 1 if step.axis == "tp" else tp
        return self.mesh.slowest(kind, self.mesh.strided_groups(group, stride, n_s), nbytes)
