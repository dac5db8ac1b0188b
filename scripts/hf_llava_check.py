"""Load an ecic export in the Hugging Face LLaVA layout with transformers and caption the same
prepared images greedily; compare with ecic's captions of the export.

Usage: hf_llava_check.py EXPORT_DIR PIXELS.safetensors IDS.txt ECIC_PRED.jsonl
Prints how many captions agree and exits 1 if any differs. Driven by scripts/hf-llava-check.sh.
"""
import json
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import LlavaForConditionalGeneration


def main():
    export, pixels_path, ids_path, pred_path = sys.argv[1:5]
    manifest = json.load(open(f"{export}/ecic-model.json"))
    cfg = json.load(open(f"{export}/config.json"))
    mc = manifest["model"]
    pad, bos, eos = mc["pad_id"], mc["bos_id"], mc["eos_id"]
    # As ecic's decoding: at most max_len tokens (EOS included), capped by the model's
    # positions (its longest caption plus the EOS).
    max_new = min(manifest["decoding"]["max_len"], mc["max_caption_len"] + 1)
    image_token = cfg["image_token_index"]
    n_img = cfg["image_seq_length"]
    model = LlavaForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(f"{export}/tokenizer.json")
    pixels = load_file(pixels_path)["pixel_values"]
    ids = [l for l in open(ids_path).read().splitlines() if l]
    ecic = {}
    for line in open(pred_path):
        r = json.loads(line)
        ecic[r["image_id"]] = r["text"]
    prompt = torch.tensor([[image_token] * n_img + [bos]])
    same = 0
    for i, image_id in enumerate(ids):
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                pixel_values=pixels[i : i + 1],
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        gen = out[0, prompt.shape[1] :].tolist()
        if eos in gen:
            gen = gen[: gen.index(eos)]
        text = tok.decode([t for t in gen if t not in (pad, bos, eos)], skip_special_tokens=True)
        if text == ecic.get(image_id):
            same += 1
        else:
            print(f"{image_id}: transformers {text!r} vs ecic {ecic.get(image_id)!r}")
    print(f"{same} of {len(ids)} greedy captions equal (transformers vs ecic)")
    sys.exit(0 if same == len(ids) else 1)


if __name__ == "__main__":
    main()
