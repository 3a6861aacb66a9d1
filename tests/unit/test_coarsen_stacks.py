"""Coarsening finds every stack of repeated blocks and cuts the rest into bounded pieces: ResNet-18's
four stages give per-block layers and its stem is cut, and an encoder-decoder gets per-block layers in
both stacks."""

from fxplan.passes.coarsen import coarsen
from fxplan.passes.trace import trace

import hf_zoo



def _layers(name):
    model, batch = hf_zoo.build(name)
    return model, batch, coarsen(trace(model, batch)).layers


def test_resnet18_layers_are_blocks_of_bounded_cost():
    _, _, layers = _layers("resnet18")
    total = sum(layer.flops for layer in layers)
    names = [layer.name for layer in layers]
    assert len(layers) >= 8
    assert [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)] == [n for n in names if n.startswith("layer")]
    assert max(layer.flops for layer in layers) <= 0.25 * total, [(l.name, l.flops / total) for l in layers]


def test_encoder_decoder_blocks_in_both_stacks():
    for name, stacks in (("t5", ("model.encoder.block", "model.decoder.block")),):
        _, _, layers = _layers(name)
        names = [layer.name for layer in layers]
        for stack in stacks:
            assert [n for n in names if n.startswith(stack + ".")] == [f"{stack}.0", f"{stack}.1"], names
