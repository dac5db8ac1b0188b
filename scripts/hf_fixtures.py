"""Tiny random Hugging Face checkpoints and their transformers outputs, for tests/hf_checkpoint.rs.

Run through scripts/make-hf-fixtures.sh. Every model is built from a fixed seed, its weights are
redrawn at scales that keep activations O(1) (HF's own init, std 0.02, would make every output
near zero and hide mistakes), written in HF layout (config.json + float32 safetensors) and run
on fixed inputs; inputs and outputs go to expected.safetensors beside the weights.
"""

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

VOCAB = 64
IMAGE_TOKEN = 63


def redraw(model, seed):
    """Matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights 1 + N(0, 0.2), biases N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                base = 0.0 if name.endswith("bias") else 1.0
                if "embedding" in name:  # CLIP's class embedding
                    base = 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name and "patch" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def llama_config(**kw):
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )


def phi3_config(**kw):
    return Phi3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )


def opt_config():
    """OPT as BLIP-2's LM uses it (opt-2.7b's options: pre-LN, ReLU, biases, tied head, learned
    positions with transformers' offset of 2), tiny."""
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        do_layer_norm_before=True,
        activation_function="relu",
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )


def clip_config():
    return CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def text_ids(seed, batch=2, length=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMAGE_TOKEN, (batch, length), generator=g)


def images(seed, batch=2, side=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, side, side), generator=g)


def save(model, out: Path, expected: dict, **save_kw):
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, **save_kw)
    # save_pretrained may add generation_config.json; the loader needs only config.json.
    (out / "generation_config.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")


def causal_lm(cls, cfg, seed, out, **save_kw):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    redraw(model, seed)
    ids = text_ids(seed + 1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save(model, out, {"input_ids": ids, "logits": logits}, **save_kw)


def clip(out):
    torch.manual_seed(10)
    model = CLIPVisionModel(clip_config()).eval()
    redraw(model, 10)
    px = images(11)
    with torch.no_grad():
        hs = model(pixel_values=px, output_hidden_states=True).hidden_states
    expected = {"pixel_values": px}
    for i, h in enumerate(hs):
        expected[f"hidden_states.{i}"] = h
    save(model, out, expected)


def llava(out):
    cfg = LlavaConfig(
        vision_config=clip_config(),
        text_config=llama_config(),
        image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(20)
    model = LlavaForConditionalGeneration(cfg).eval()
    redraw(model, 20)
    px = images(21)
    ids = text_ids(22)
    n_img = (32 // 8) ** 2
    full = torch.cat([torch.full((ids.shape[0], n_img), IMAGE_TOKEN), ids], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, pixel_values=px).logits
    save(
        model,
        out,
        {"pixel_values": px, "input_ids": ids, "logits": logits[:, n_img:, :]},
    )


def tokenizer(out: Path):
    """A character-level WordLevel tokenizer.json of 63 ids (the LLaVA fixture's vocabulary is
    64 with the image token last): specials, then Chinese characters frequent in the synthetic
    captions; anything else is <unk>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = "夏季春秋冬四男女士同款学生情侣儿童新时尚休闲简约百搭宽松修身韩版潮流纯棉短袖长裤连衣裙外套鞋包黑白红蓝色大小码条纹格子印花"
    chars = list(dict.fromkeys(chars))[: 63 - 4]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) == 63
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    tok.save(str(out / "tokenizer.json"))


def main():
    root = Path(sys.argv[1])
    torch.set_default_dtype(torch.float32)
    causal_lm(LlamaForCausalLM, llama_config(), 0, root / "llama")
    phi3 = phi3_config(max_position_embeddings=128, original_max_position_embeddings=128)
    # Sharded on purpose: the loader reads model.safetensors.index.json.
    causal_lm(Phi3ForCausalLM, phi3, 5, root / "phi3", max_shard_size="40KB")
    # LongRoPE as Phi-3-vision / Phi-3-mini-128k use it ("su" in their hub configs): the
    # context extended 4x past original_max_position_embeddings, so cos/sin carry the
    # attention factor sqrt(1 + ln 4 / ln 64) and each frequency its short factor.
    longrope = phi3_config(
        max_position_embeddings=256,
        original_max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.5, 2.5, 4.0],
            "long_factor": [3.0, 5.0, 9.0, 17.0],
        },
    )
    causal_lm(Phi3ForCausalLM, longrope, 6, root / "phi3-longrope")
    causal_lm(OPTForCausalLM, opt_config(), 7, root / "opt")
    clip(root / "clip")
    llava(root / "llava")
    tokenizer(root / "llava")
    print(json.dumps({p.name: sum(f.stat().st_size for f in p.iterdir()) for p in root.iterdir()}))


if __name__ == "__main__":
    main()
