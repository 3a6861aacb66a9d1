"""The presets compute the public models' functions: same weights in HF transformers, same loss.

Catches layout mistakes that a self-consistency test cannot (rotary convention, GQA head pairing,
fused-qkv order, post-LN placement, MLM head)."""

import pytest
import torch
import torch.nn.functional as F

from fxplan.models import build, example_batch

transformers = pytest.importorskip("transformers")


def _fuse_qkv(wq, wk, wv, heads):
    """Separate q/k/v rows -> our per-head fused layout [q_h, k_h, v_h] for each head h."""
    stacked = torch.stack([w.reshape(heads, -1, *w.shape[1:]) for w in (wq, wk, wv)], dim=1)
    return stacked.reshape(-1, *wq.shape[1:])


def _hf_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


@torch.no_grad()
def test_llama_with_gqa_matches_hf_llama():
    ours = build("llama:layers=2,hidden=64,heads=8,kv_heads=2,ffn=96,vocab=128,seq=16")
    cfg = ours.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq,
        rms_norm_eps=cfg.eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False, attn_implementation="eager")).eval()
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.lm_head.weight}
    for i, block in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": block.attn_norm.weight,
               p + "post_attention_layernorm.weight": block.mlp_norm.weight,
               p + "self_attn.q_proj.weight": block.attn.q.weight, p + "self_attn.k_proj.weight": block.attn.k.weight,
               p + "self_attn.v_proj.weight": block.attn.v.weight, p + "self_attn.o_proj.weight": block.attn.o.weight,
               p + "mlp.gate_proj.weight": block.mlp.gate.weight, p + "mlp.up_proj.weight": block.mlp.up.weight,
               p + "mlp.down_proj.weight": block.mlp.down.weight}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in key for key in missing)
    tokens, targets = example_batch(ours, 2)
    torch.testing.assert_close(ours(tokens, targets), _hf_loss(hf(tokens).logits, targets))


@torch.no_grad()
def test_gpt_matches_hf_gpt2():
    ours = build("gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16")
    cfg = ours.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab, n_positions=cfg.seq, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
        activation_function="gelu", layer_norm_epsilon=cfg.eps, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager")).eval()
    sd = {"transformer.wte.weight": ours.wte.weight, "transformer.wpe.weight": ours.wpe.weight,
          "transformer.ln_f.weight": ours.ln_f.weight, "transformer.ln_f.bias": ours.ln_f.bias,
          "lm_head.weight": ours.wte.weight}
    for i, block in enumerate(ours.blocks):
        p = f"transformer.h.{i}."
        # HF Conv1D stores (in, out) with outputs [all q | all k | all v]; ours is per head.
        w = block.attn.qkv.weight.reshape(cfg.heads, 3, -1, cfg.hidden).transpose(0, 1).reshape(-1, cfg.hidden)
        b = block.attn.qkv.bias.reshape(cfg.heads, 3, -1).transpose(0, 1).reshape(-1)
        sd |= {p + "ln_1.weight": block.ln1.weight, p + "ln_1.bias": block.ln1.bias,
               p + "ln_2.weight": block.ln2.weight, p + "ln_2.bias": block.ln2.bias,
               p + "attn.c_attn.weight": w.t(), p + "attn.c_attn.bias": b,
               p + "attn.c_proj.weight": block.attn.proj.weight.t(), p + "attn.c_proj.bias": block.attn.proj.bias,
               p + "mlp.c_fc.weight": block.mlp.fc.weight.t(), p + "mlp.c_fc.bias": block.mlp.fc.bias,
               p + "mlp.c_proj.weight": block.mlp.proj.weight.t(), p + "mlp.c_proj.bias": block.mlp.proj.bias}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith(".attn.bias")]
    tokens, targets = example_batch(ours, 2)
    torch.testing.assert_close(ours(tokens, targets), _hf_loss(hf(tokens).logits, targets))


@torch.no_grad()
def test_bert_matches_hf_bert_for_masked_lm():
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager")).eval()
    ours = build("bert:layers=2,hidden=64,heads=4,vocab=128,seq=16")
    hsd = hf.state_dict()
    e = "bert.embeddings."
    sd = {"word.weight": hsd[e + "word_embeddings.weight"], "position.weight": hsd[e + "position_embeddings.weight"],
          "segment.weight": hsd[e + "token_type_embeddings.weight"],
          "ln_embed.weight": hsd[e + "LayerNorm.weight"], "ln_embed.bias": hsd[e + "LayerNorm.bias"],
          "head_dense.weight": hsd["cls.predictions.transform.dense.weight"],
          "head_dense.bias": hsd["cls.predictions.transform.dense.bias"],
          "head_ln.weight": hsd["cls.predictions.transform.LayerNorm.weight"],
          "head_ln.bias": hsd["cls.predictions.transform.LayerNorm.bias"],
          "decoder_bias": hsd["cls.predictions.bias"]}
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        a = p + "attention."
        sd |= {f"blocks.{i}.attn.qkv.weight": _fuse_qkv(*(hsd[a + f"self.{n}.weight"] for n in ("query", "key", "value")), 4),
               f"blocks.{i}.attn.qkv.bias": _fuse_qkv(*(hsd[a + f"self.{n}.bias"] for n in ("query", "key", "value")), 4),
               f"blocks.{i}.attn.proj.weight": hsd[a + "output.dense.weight"],
               f"blocks.{i}.attn.proj.bias": hsd[a + "output.dense.bias"],
               f"blocks.{i}.ln1.weight": hsd[a + "output.LayerNorm.weight"],
               f"blocks.{i}.ln1.bias": hsd[a + "output.LayerNorm.bias"],
               f"blocks.{i}.fc.weight": hsd[p + "intermediate.dense.weight"],
               f"blocks.{i}.fc.bias": hsd[p + "intermediate.dense.bias"],
               f"blocks.{i}.proj.weight": hsd[p + "output.dense.weight"],
               f"blocks.{i}.proj.bias": hsd[p + "output.dense.bias"],
               f"blocks.{i}.ln2.weight": hsd[p + "output.LayerNorm.weight"],
               f"blocks.{i}.ln2.bias": hsd[p + "output.LayerNorm.bias"]}
    ours.load_state_dict(sd, strict=True)
    tokens, targets = example_batch(ours, 2)
    torch.testing.assert_close(ours(tokens, targets), _hf_loss(hf(tokens).logits, targets))


def _pick(state, *names):
    """The first of `names` present (HF renamed ViT's modules between major versions)."""
    for name in names:
        if name in state:
            return state[name]
    pytest.skip(f"this transformers version names none of {names}")


@torch.no_grad()
def test_vit_matches_hf_vit_with_conv_patch_embedding():
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, num_labels=10, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")).eval()
    ours = build("vit:layers=2,hidden=64,heads=4,image=32,patch=8,classes=10")
    hsd = hf.state_dict()
    e = "vit.embeddings."
    # A stride-p Conv2d is a Linear over (channel, row, column)-flattened patches.
    sd = {"patch_embed.weight": hsd[e + "patch_embeddings.projection.weight"].reshape(64, -1),
          "patch_embed.bias": hsd[e + "patch_embeddings.projection.bias"],
          "cls": hsd[e + "cls_token"], "pos": hsd[e + "position_embeddings"],
          "ln_f.weight": hsd["vit.layernorm.weight"], "ln_f.bias": hsd["vit.layernorm.bias"],
          "head.weight": hsd["classifier.weight"], "head.bias": hsd["classifier.bias"]}
    for i in range(2):
        new, old = f"vit.layers.{i}.", f"vit.encoder.layer.{i}."

        def get(new_name, old_name):
            return _pick(hsd, new + new_name, old + old_name)

        for kind in ("weight", "bias"):
            qkv = [get(f"attention.{n}_proj.{kind}", f"attention.attention.{m}.{kind}")
                   for n, m in (("q", "query"), ("k", "key"), ("v", "value"))]
            sd |= {f"blocks.{i}.attn.qkv.{kind}": _fuse_qkv(*qkv, 4),
                   f"blocks.{i}.attn.proj.{kind}": get(f"attention.o_proj.{kind}", f"attention.output.dense.{kind}"),
                   f"blocks.{i}.ln1.{kind}": get(f"layernorm_before.{kind}", f"layernorm_before.{kind}"),
                   f"blocks.{i}.ln2.{kind}": get(f"layernorm_after.{kind}", f"layernorm_after.{kind}"),
                   f"blocks.{i}.fc.{kind}": get(f"mlp.fc1.{kind}", f"intermediate.dense.{kind}"),
                   f"blocks.{i}.proj.{kind}": get(f"mlp.fc2.{kind}", f"output.dense.{kind}")}
    ours.load_state_dict(sd, strict=True)
    images, labels = example_batch(ours, 3)
    torch.testing.assert_close(ours(images, labels), F.cross_entropy(hf(images).logits, labels))
