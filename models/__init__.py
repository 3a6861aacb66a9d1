"""fxplan.models: model presets that trace cleanly (GPT, Llama, BERT, ViT, MLP) and their registry.

    from fxplan.models import build, example_batch
    model = build("gpt:layers=4,hidden=128,heads=4")          # or "gpt3-175b", device="meta"
    loss = model(*example_batch(model, batch=8))               # scalar mean loss

Every preset's `forward(inputs, targets)` returns the per-sample mean training loss, keeps its
repeated blocks in `model.blocks` (an nn.ModuleList) and its config in `model.config`.
"""

from fxplan.models.bert import Bert, BertConfig
from fxplan.models.gpt import GPT, GPTConfig
from fxplan.models.llama import Llama, LlamaConfig
from fxplan.models.mlp import MLP, MLPConfig
from fxplan.models.registry import (
    PRESETS,
    SIZES,
    Size,
    build,
    describe,
    example_batch,
    num_parameters,
    parse_spec,
    spec_keys,
)
from fxplan.models.vit import ViT, ViTConfig

__all__ = [
    "PRESETS", "SIZES", "Size", "build", "describe", "example_batch", "num_parameters", "parse_spec", "spec_keys",
    "GPT", "GPTConfig", "Llama", "LlamaConfig", "Bert", "BertConfig", "ViT", "ViTConfig", "MLP", "MLPConfig",
]
