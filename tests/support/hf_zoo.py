"""Tiny random-config architectures as users bring them (transformers 5, no downloads), each wrapped so
forward(*batch) returns the scalar training loss. ResNet-18 is written here after torchvision's
definition (torchvision's wheel on the package index is a CUDA build that does not import next to CPU
torch), block for block: BasicBlock stages [2, 2, 2, 2], BatchNorm after every conv.

`build(name)` -> (model, batch) with a fixed seed; `batch(name, model, seed)` another batch of the same
shape. GROUPS gives the architecture families the bench and the tests launch together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, BATCH, HID, HEADS = 64, 8, 8, 32, 4
IMAGE, CLASSES = 16, 8


class CausalLM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss  # the default call: a KV cache is built


class Labelled(nn.Module):
    """forward(inputs, labels) -> model(**{key: inputs}, labels=labels).loss (encoders, seq2seq, vision)."""

    def __init__(self, model, key="input_ids"):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, inputs, labels):
        return self.model(**{self.key: inputs}, labels=labels).loss


class WeightedClassifier(nn.Module):
    """A class-weighted mean (cross_entropy(weight=...)): sum(w_y * nll) / sum(w_y) over the batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("class_weight", torch.linspace(0.5, 2.0, CLASSES))

    def forward(self, inputs, labels):
        logits = self.model(input_ids=inputs).logits
        return F.cross_entropy(logits, labels, weight=self.class_weight)


# ---------------------------------------------------------------- ResNet-18 (torchvision's layout)


class BasicBlock(nn.Module):
    def __init__(self, inp, out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, classes=CLASSES, width=64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, w, 1))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w, 1))
        self.layer4 = nn.Sequential(BasicBlock(4 * w, 8 * w, 2), BasicBlock(8 * w, 8 * w, 1))
        self.fc = nn.Linear(8 * w, classes)

    def forward(self, x, y):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.cross_entropy(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), y)


class StridedBlock(nn.Module):
    """Returns a non-contiguous view (every other element of a widened tensor), as broadcast masks and
    transposes do at a pipeline stage boundary."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(HID, HID)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return torch.stack([h, -h], -1)[..., 0]


class StridedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(StridedBlock() for _ in range(4))
        self.head = nn.Linear(HID, CLASSES)

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x), y)


# ---------------------------------------------------------------- builders


def _tf():
    import transformers

    return transformers


def _decoder(cls_name, cfg_name, **kw):
    def make():
        tf = _tf()
        cfg = getattr(tf, cfg_name)(**kw)
        return CausalLM(getattr(tf, cls_name)(cfg))
    return make


_DEC = dict(vocab_size=VOCAB, hidden_size=HID, intermediate_size=2 * HID, num_hidden_layers=2,
            num_attention_heads=HEADS, max_position_embeddings=32)
_NO_DROP = dict(attention_dropout=0.0)

DECODERS = {
    "gpt2": _decoder("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_positions=32, n_embd=HID, n_layer=2,
                     n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": _decoder("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=HEADS, **_DEC, **_NO_DROP),
    "mistral": _decoder("MistralForCausalLM", "MistralConfig", num_key_value_heads=2, **_DEC, **_NO_DROP),
    "qwen2": _decoder("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=HEADS, **_DEC, **_NO_DROP),
    "gpt_neox": _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_dropout=0.0, **_DEC, **_NO_DROP),
    "falcon": _decoder("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=2,
                       num_attention_heads=HEADS, hidden_dropout=0.0, attention_dropout=0.0,
                       new_decoder_architecture=False, alibi=False),
    "phi": _decoder("PhiForCausalLM", "PhiConfig", resid_pdrop=0.0, embd_pdrop=0.0, **_DEC, **_NO_DROP),
    "gemma": _decoder("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=HEADS, head_dim=HID // HEADS,
                      tie_word_embeddings=True, **_DEC, **_NO_DROP),
    "opt": _decoder("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=HID, ffn_dim=2 * HID,
                    num_hidden_layers=2, num_attention_heads=HEADS, max_position_embeddings=32,
                    word_embed_proj_dim=HID, dropout=0.0, attention_dropout=0.0),
    "bloom": _decoder("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=HID, n_layer=2, n_head=HEADS,
                      hidden_dropout=0.0, attention_dropout=0.0),
    "mixtral": _decoder("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=HEADS, num_local_experts=4,
                        num_experts_per_tok=2, router_aux_loss_coef=0.0, **_DEC, **_NO_DROP),
}

_ENC = dict(vocab_size=VOCAB, hidden_size=HID, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=2 * HID, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def _encoder(cls_name, cfg_name, **kw):
    def make():
        tf = _tf()
        return Labelled(getattr(tf, cls_name)(getattr(tf, cfg_name)(**kw)))
    return make


ENCODERS = {
    "bert": _encoder("BertForMaskedLM", "BertConfig", **_ENC),
    "roberta": _encoder("RobertaForMaskedLM", "RobertaConfig", pad_token_id=1, **_ENC),
    "distilbert": _encoder("DistilBertForMaskedLM", "DistilBertConfig", vocab_size=VOCAB, dim=HID, n_layers=2,
                           n_heads=HEADS, hidden_dim=2 * HID, max_position_embeddings=32, dropout=0.0,
                           attention_dropout=0.0),
    "electra": _encoder("ElectraForMaskedLM", "ElectraConfig", embedding_size=HID, **_ENC),
}

SEQ2SEQ = {
    "t5": _encoder("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=HID, d_kv=HID // HEADS,
                   d_ff=2 * HID, num_layers=2, num_decoder_layers=2, num_heads=HEADS, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0),
    "bart": _encoder("BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=HID,
                     encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
                     decoder_attention_heads=HEADS, encoder_ffn_dim=2 * HID, decoder_ffn_dim=2 * HID,
                     max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     decoder_start_token_id=2, pad_token_id=1),
}


def _vision(cls_name, cfg_name, **kw):
    def make():
        tf = _tf()
        return Labelled(getattr(tf, cls_name)(getattr(tf, cfg_name)(**kw)), key="pixel_values")
    return make


_VIT = dict(image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=HID, num_hidden_layers=2,
            num_attention_heads=HEADS, intermediate_size=2 * HID, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=CLASSES)

VISION = {
    "vit": _vision("ViTForImageClassification", "ViTConfig", **_VIT),
    "deit": _vision("DeiTForImageClassification", "DeiTConfig", **_VIT),
    "swin": _vision("SwinForImageClassification", "SwinConfig", image_size=IMAGE, patch_size=2, embed_dim=16,
                    depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=CLASSES, drop_path_rate=0.0,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "convnext": _vision("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[2, 2],
                        num_labels=CLASSES, image_size=IMAGE, drop_path_rate=0.0),
    "resnet18": lambda: ResNet18(width=16),
}


def _weighted():
    tf = _tf()
    cfg = tf.BertConfig(num_labels=CLASSES, **_ENC)
    return WeightedClassifier(tf.BertForSequenceClassification(cfg))


LOSSES = {"bert_weighted": _weighted}
TOYS = {"strided": StridedNet}

BUILDERS = {**DECODERS, **ENCODERS, **SEQ2SEQ, **VISION, **LOSSES, **TOYS}
GROUPS = {"decoders": list(DECODERS), "encoders": list(ENCODERS) + list(LOSSES), "seq2seq": list(SEQ2SEQ),
          "vision": list(VISION)}


def batch(name: str, seed: int = 1, size: int = BATCH) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if name in VISION:
        side = 32 if name == "resnet18" else IMAGE  # 32: every stage keeps a spatial extent, as at 224
        return torch.randn(size, 3, side, side, generator=g), torch.randint(0, CLASSES, (size,), generator=g)
    if name in TOYS:
        return torch.randn(size, HID, generator=g), torch.randint(0, CLASSES, (size,), generator=g)
    if name in LOSSES:
        ids = torch.randint(3, VOCAB, (size, SEQ), generator=g)
        return ids, torch.randint(0, CLASSES, (size,), generator=g)
    ids = torch.randint(3, VOCAB, (size, SEQ), generator=g)
    labels = ids.clone()
    if name in ENCODERS or name in SEQ2SEQ:
        # masked-LM style: most positions ignored, a different number of valid tokens per sample
        keep = torch.rand(size, SEQ, generator=g) < 0.3
        keep[:, 0] = True
        keep[: size // 2] = False
        keep[: size // 2, 0] = True
        labels = torch.where(keep, labels, torch.full_like(labels, -100))
    return ids, labels


def build(name: str):
    """(model, batch) with the same weights on every call (fixed seed), in train mode."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    model.train()
    return model, batch(name)
