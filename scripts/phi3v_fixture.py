"""A tiny random Phi-3-Vision checkpoint (`Phi3VForCausalLM` key layout) and its reference
outputs, for tests/hf_checkpoint.rs. Run through scripts/make-hf-fixtures.sh:

    phi3v_fixture.py OUT_DIR IMAGE_EMBEDDING_PY

Phi-3-Vision has no transformers class; its model code is published on the hub beside the
weights (microsoft/Phi-3-vision-128k-instruct). IMAGE_EMBEDDING_PY is a copy of that
repository's `image_embedding_phi3_v.py`, the module that turns pixel values into image
embeddings and places them among the token embeddings. It is not copied here: this script reads
it, adapts the constants that hard-code the 336-px ViT-L/14 tower (crop size, tokens per crop,
feature width) to the tiny tower, and runs its `Phi3ImageEmbedding` as published otherwise
(tower features at `layer_idx` -2 without the class token, 2x2 merge, `sub_GN` newlines,
`glb_GN`, `sub_glb` order, `img_projection`, and the `index_put` of the image embeddings at the
negative ids). The LM is transformers' `Phi3ForCausalLM` with the same LongRoPE (`"su"`) the
published config uses, fed those embeddings, which is what `Phi3VModel.forward` does.

Outputs (expected.safetensors): the HD images, the views the image processor would stack (global
view by its bicubic `interpolate`, then the crops), the tower features, the assembled and
projected HD embeddings, the caption ids and the LM logits at the caption positions.
"""

import hashlib
import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, Phi3Config, Phi3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_fixtures as hf  # noqa: E402  (redraw, ids, the caption tokenizer)

CROP = 32  # the tiny tower's input side (336 in Phi-3-Vision)
PATCH = 8
WIDTH = 32  # tower width (image_dim_out; 1024 in Phi-3-Vision)
GRID = 2  # crops per side of the HD image (the tiny preset's hd_grid)
SIDE = CROP // PATCH  # patch grid per crop
MERGED = (SIDE // 2) ** 2  # tokens per view after the 2x2 merge (num_img_tokens)
# (crops + global) * merged tokens + glb_GN + one sub_GN per row of both grids
N_IMG = (GRID * GRID + 1) * MERGED + 1 + (GRID + 1) * (SIDE // 2)


def clip_config():
    return CLIPVisionConfig(
        image_size=CROP,
        patch_size=PATCH,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,  # three, so that layer -2 is neither the first nor the last
        num_attention_heads=4,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


SHORT = [1.0, 1.5, 2.5, 4.0]
LONG = [3.0, 5.0, 9.0, 17.0]
EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}


def img_processor():
    v = clip_config().to_dict()
    keep = [
        "hidden_size", "image_size", "intermediate_size", "num_attention_heads",
        "num_hidden_layers", "patch_size", "hidden_act", "layer_norm_eps", "model_type",
    ]
    return {
        "image_dim_out": WIDTH,
        "model_name": "tiny-random-clip (see vision_config)",
        "name": "clip_vision_model",
        "num_img_tokens": MERGED,
        "vision_config": {k: v[k] for k in keep},
    }


def lm_config():
    """The reference LM: Phi-3 with LongRoPE in transformers 5's form (config.json keeps the
    published `rope_scaling = {"type": "su"}` form of the same thing)."""
    return Phi3Config(
        vocab_size=hf.VOCAB,
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
        max_position_embeddings=512,
        original_max_position_embeddings=128,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": SHORT,
            "long_factor": LONG,
        },
    )


def published_config():
    """config.json in the published Phi3V form (Phi-3-vision-128k-instruct's fields, tiny)."""
    return {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "embd_layer": EMBD_LAYER,
        "hidden_act": "silu",
        "hidden_size": 32,
        "img_processor": img_processor(),
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "original_max_position_embeddings": 128,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": LONG, "short_factor": SHORT, "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 512,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": hf.VOCAB,
    }


def load_reference(path: Path):
    """The published image_embedding_phi3_v.py with its ViT-L/14-336 constants made the tiny
    tower's; every substitution must apply exactly as counted, so a different file fails here."""
    src = path.read_text()
    subs = [
        # The tower the module builds: ours (its config is set on the module below).
        ("assert config.img_processor['model_name'] == 'openai/clip-vit-large-patch14-336'", "pass", 1),
        ("assert c == 3 and h == w == 336", f"assert c == 3 and h == w == {CROP}", 1),
        ("assert L == 24 * 24 and C == 1024", f"assert L == {SIDE * SIDE} and C == {WIDTH}", 1),
        ("h_crop = h // 336", f"h_crop = h // {CROP}", 1),
        ("w_crop = w // 336", f"w_crop = w // {CROP}", 1),
    ]
    for old, new, n in subs:
        found = src.count(old)
        if found != n:
            sys.exit(f"{path}: expected {n} occurrence(s) of {old!r}, found {found}")
        src = src.replace(old, new)
    mod = types.ModuleType("image_embedding_phi3_v")
    mod.__file__ = str(path)
    exec(compile(src, str(path), "exec"), mod.__dict__)
    mod.CLIP_VIT_LARGE_PATCH14_336_CONFIG = clip_config()
    return mod


def views(hd):
    """What the published image processor stacks for HD images (B,3,H,H): the global view by
    `interpolate(mode="bicubic")` of the normalised image, then the crops row-major (its
    `preprocess`, from the tensor on; resizing and padding PIL images do not apply here)."""
    out = []
    for im in hd:
        h, w = im.shape[1:]
        glb = F.interpolate(im.unsqueeze(0).float(), size=(CROP, CROP), mode="bicubic")
        crops = (
            im.reshape(1, 3, h // CROP, CROP, w // CROP, CROP)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(-1, 3, CROP, CROP)
        )
        out.append(torch.cat([glb, crops], dim=0))
    return torch.stack(out, dim=0)


def main():
    out = Path(sys.argv[1])
    ref_path = Path(sys.argv[2])
    torch.set_default_dtype(torch.float32)
    ref = load_reference(ref_path)

    seed = 30
    torch.manual_seed(seed)
    lm = Phi3ForCausalLM(lm_config()).eval()
    hf.redraw(lm, seed)
    cfg = lm_config()
    cfg.img_processor = img_processor()
    cfg.embd_layer = EMBD_LAYER
    cfg._attn_implementation = "eager"
    emb = ref.Phi3ImageEmbedding(cfg, wte=lm.model.embed_tokens, **EMBD_LAYER).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        hf.redraw(emb.img_processor, seed + 2)
        hf.redraw(emb.img_projection, seed + 3)
        # The separators start at zero in the reference; drawn at the scale of the features
        # so that a misplaced one shows.
        emb.glb_GN.copy_(torch.randn(emb.glb_GN.shape, generator=g))
        emb.sub_GN.copy_(torch.randn(emb.sub_GN.shape, generator=g))

    batch = 2
    hd = hf.images(seed + 4, batch=batch, side=CROP * GRID)
    px = views(hd)  # (B, 1 + GRID², 3, CROP, CROP)
    sizes = torch.tensor([[CROP * GRID, CROP * GRID]] * batch)
    # Our captioning form: the image's tokens first (the processor's -1 for <|image_1|>), then
    # BOS and the caption.
    ids = hf.text_ids(seed + 5, batch=batch, length=8)
    ids[:, 0] = 1
    full = torch.cat([torch.full((batch, N_IMG), -1), ids], dim=1)
    with torch.no_grad():
        flat = px.flatten(0, 1)
        feats = emb.get_img_features(flat)  # hidden_states[-2][:, 1:]
        hd_embeds = emb.hd_feature_transform(
            feats.reshape(batch, GRID * GRID + 1, -1, WIDTH), sizes
        ).reshape(batch, N_IMG, -1)
        inputs = emb(full.clone(), px, image_sizes=sizes)
        logits = lm(inputs_embeds=inputs).logits[:, N_IMG:, :]
        # The embeddings the reference placed are the assembled ones, at the image slots.
        assert torch.equal(inputs[:, :N_IMG], hd_embeds)

    # The published key layout: the LM at the top, the image embedding under
    # model.vision_embed_tokens (its `wte` is the LM's embed_tokens and is not stored).
    state = {k: v for k, v in lm.state_dict().items()}
    for k, v in emb.state_dict().items():
        if k.startswith("wte."):
            continue
        # transformers 5 has no `vision_model.` level in CLIPVisionModel's keys; the published
        # checkpoint (written by transformers 4.38) has it.
        if k.startswith("img_processor.") and not k.startswith("img_processor.vision_model."):
            k = "img_processor.vision_model." + k[len("img_processor."):]
        state[f"model.vision_embed_tokens.{k}"] = v
    state = {k: v.contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    # Two shards, as published: the embeddings and the image module in the first.
    first = {k for k in state if k.startswith(("model.vision_embed_tokens.", "model.embed_tokens."))}
    shards = {
        "model-00001-of-00002.safetensors": {k: state[k] for k in sorted(first)},
        "model-00002-of-00002.safetensors": {k: state[k] for k in sorted(set(state) - first)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(published_config(), indent=2) + "\n")
    hf.tokenizer(out)
    digest = hashlib.sha256(ref_path.read_bytes()).hexdigest()
    expected = {
        "pixel_values": hd,
        "views": px.flatten(0, 1),
        "img_features": feats,
        "hd_embeds": hd_embeds,
        "input_ids": ids,
        "logits": logits,
    }
    save_file(
        {k: v.contiguous() for k, v in expected.items()},
        out / "expected.safetensors",
        # One key: safetensors writes metadata in no fixed order.
        metadata={"image_embedding_phi3_v.py sha256": digest},
    )
    print(json.dumps({"phi3v": sum(f.stat().st_size for f in out.iterdir()), "n_img": N_IMG,
                      "reference_sha256": digest}))


if __name__ == "__main__":
    main()
