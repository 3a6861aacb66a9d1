"""Training batch norm with statistics over the whole dp group: synchronised BatchNorm.

torch.nn.SyncBatchNorm's math (torch/nn/modules/_functions.py) on this job's Communicator:
forward all-reduces each channel's (count, sum, sum of squares) over the dp group, normalises with
the global mean and biased variance and moves the running statistics by the global mean and the
unbiased variance, exactly as one device does on the whole batch; backward all-reduces each
channel's (sum dy, sum dy * xhat), the terms through which every sample's gradient depends on the
others. Weight and bias gradients stay local sums: the dp gradient sum adds them up like any other
parameter's.

The statistics are summed in float64 from each rank's own mean and variance (torch.var_mean, as
accurate as one device's kernel), so the global variance loses nothing to the E[x^2] - E[x]^2
cancellation at float32.
"""

from __future__ import annotations

import torch

from fxplan.runtime import flat_ops as ops
from fxplan.runtime.comm import Communicator


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


class SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, comm: Communicator, key: str):
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
        mean, var = mean.double(), var.double()
        stats = torch.cat([torch.full((1,), float(count), dtype=torch.float64), count * mean,
                           count * (var + mean * mean)])
        stats = ops.all_reduce(comm, stats, key, "fwd")
        channels = x.shape[1]
        n = stats[0]
        g_mean = stats[1:1 + channels] / n
        g_var = (stats[1 + channels:] / n - g_mean * g_mean).clamp_min(0.0)
        invstd = torch.rsqrt(g_var + eps)
        if running_mean is not None and momentum is not None:
            with torch.no_grad():
                total = float(n)
                running_mean.mul_(1 - momentum).add_(momentum * g_mean.to(running_mean.dtype))
                unbiased = g_var * (total / max(total - 1.0, 1.0))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        mean_t, invstd_t = g_mean.to(x.dtype), invstd.to(x.dtype)
        xhat = (x - _per_channel(mean_t, x)) * _per_channel(invstd_t, x)
        y = xhat
        if weight is not None:
            y = y * _per_channel(weight, x)
        if bias is not None:
            y = y + _per_channel(bias, x)
        ctx.save_for_backward(x, weight, mean_t, invstd_t)
        ctx.comm, ctx.key, ctx.n, ctx.has_bias = comm, key, float(n), bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, x.dim()))
        xhat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        sum_dy = grad.sum(dims)
        sum_dy_xhat = (grad * xhat).sum(dims)
        grad_weight = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = ops.all_reduce(ctx.comm, torch.cat([sum_dy, sum_dy_xhat]).double(), ctx.key, "bwd")
            channels = x.shape[1]
            mean_dy = (both[:channels] / ctx.n).to(grad.dtype)
            mean_dy_xhat = (both[channels:] / ctx.n).to(grad.dtype)
            scale = invstd if weight is None else invstd * weight
            grad_x = (grad - _per_channel(mean_dy, x) - xhat * _per_channel(mean_dy_xhat, x)) * _per_channel(scale, x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None
