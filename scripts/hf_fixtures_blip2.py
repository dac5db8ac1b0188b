"""A tiny random `Blip2ForConditionalGeneration` (OPT language model) with a GPT-2-style byte-level
BPE tokenizer and transformers' outputs on fixed inputs, for tests/hf_checkpoint.rs.

Run through scripts/make-hf-fixtures.sh after hf_fixtures.py; writes only <out>/blip2/. The
weights are redrawn as in hf_fixtures.py (activations O(1)); expected.safetensors holds
- `pixel_values` (2 images) and `input_ids` (BOS then 7 random ids): the text the LM reads after
  the query tokens, and `logits` at those text positions, from `forward` with the
  `num_query_tokens` image placeholders first, as Blip2Processor lays them out;
- `gen_pixel_values` (8 images) and `gen_ids`: the ids greedy `generate` adds after the
  placeholders and BOS that it starts from when given no text.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
)

from hf_fixtures import images, redraw

QUERIES = 32
NEW_TOKENS = 12
# The id of "\n" (byte 10): the 4 special ids, then the byte symbols in byte order.
NEWLINE = 4 + 10
# Characters frequent in the synthetic captions, each merged from its UTF-8 bytes so that a
# caption is not three tokens per character.
CHARS = "夏季春秋冬男女士同款学生儿童新时尚休闲简约百搭宽松修身韩版潮流纯棉短袖长裤连衣裙外套鞋包黑白红蓝色大小码条纹格子印花"


def byte_symbols():
    """GPT-2's reversible map from the 256 byte values to printable characters: printable
    Latin-1 bytes stand for themselves, the others take code points from 256 upwards."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def tokenizer(out: Path):
    """OPT's special ids (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3), the 256 byte symbols, the
    CHARS merges, and `<image>` last as Blip2Processor adds it. `</s>` starts a text, as OPT's
    tokenizer writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    sym = byte_symbols()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[sym[b]] = len(vocab)
    merges = []
    for c in dict.fromkeys(CHARS):
        bs = [sym[b] for b in c.encode("utf-8")]
        left = bs[0]
        for right in bs[1:]:
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
            left = left + right
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", 2)]
    )
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>"])
    image = tok.add_special_tokens(["<image>"])
    assert image == 1
    tok.save(str(out / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


def config(vocab):
    vision = Blip2VisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    # Three layers, cross-attention every second one (layers 0 and 2), an FFN width that is not
    # a multiple of the width.
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        cross_attention_frequency=2,
    )
    text = OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        do_layer_norm_before=True,
        activation_function="relu",
        bos_token_id=2,
        # BLIP-2's OPT configs end a caption at "\n" (its byte symbol here), not at `</s>`.
        eos_token_id=NEWLINE,
        pad_token_id=1,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=vocab - 1,
    )


def main():
    out = Path(sys.argv[1]) / "blip2"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.float32)
    vocab = tokenizer(out)
    cfg = config(vocab)
    torch.manual_seed(30)
    model = Blip2ForConditionalGeneration(cfg).eval()
    redraw(model, 30)
    # N(0, 1) rows of a tied embedding make every token's own logit dominate (|e|^2 ~ width),
    # so greedy decoding would only repeat BOS; smaller rows let the layers decide.
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight.mul_(0.3)
    px = images(31)
    g = torch.Generator().manual_seed(32)
    text = torch.randint(3, vocab - 1, (2, 7), generator=g)
    bos = cfg.text_config.bos_token_id
    ids = torch.cat([torch.full((2, 1), bos), text], dim=1)
    placeholders = torch.full((2, QUERIES), cfg.image_token_index)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([placeholders, ids], dim=1), pixel_values=px).logits
    gen_px = images(33, batch=8)
    with torch.no_grad():
        gen = model.generate(
            pixel_values=gen_px, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1
        )
    # generate returns its start (the placeholders and BOS) before the new ids.
    gen = gen[:, QUERIES + 1 :]
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    expected = {
        "pixel_values": px,
        "input_ids": ids,
        "logits": logits[:, QUERIES:, :],
        "gen_pixel_values": gen_px,
        "gen_ids": gen,
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")
    print(json.dumps({"blip2": sum(f.stat().st_size for f in out.iterdir()), "vocab": vocab}))
    print(gen.tolist())


if __name__ == "__main__":
    main()
