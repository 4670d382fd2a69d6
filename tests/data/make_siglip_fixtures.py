"""Writes the tiny SigLIP and timm ViT checkpoints of tests/data (needs
torch, transformers, timm and sentencepiece):

  python tests/data/make_siglip_fixtures.py              # all of it
  python tests/data/make_siglip_fixtures.py tokenizer    # only the tokenizer

The second keeps the SigLIP weights and rewrites only its tokenizer files
(no timm needed).

Both are randomly initialised by their reference library from configs alone
(nothing is downloaded); every parameter then gets Gaussian noise (std 0.05)
so LayerNorm scales and biases, the MAP probe, the logit scale and bias are
all non-trivial, and saved in that library's own format:

  siglip_tiny_hf/   transformers' SiglipModel.save_pretrained (config.json,
                    model.safetensors); reference.npz: "pixels" uint8
                    [4, 64, 64, 3] (coco_mini images), "ids" int32 [6, 16]
                    (random ids in [2, 100), some rows padded with the pad
                    id 1 at the end, as SigLIP pads), "image_embeds" and
                    "text_embeds" float32 (L2-normalised), "logit_scale",
                    "logit_bias".
                    spiece.model: a SentencePiece unigram model of the
                    text vocabulary's 100 ids (T5's layout, as SigLIP's
                    c4_en: <pad> 0, </s> 1, <unk> 2), trained here on the
                    coco_mini captions (data/coco_mini, CC BY / CC BY-SA)
                    canonicalised as SiglipTokenizer canonicalises, with the
                    "identity" normalisation rule (NFKC's table alone would
                    be 240 KB); tokenizer_reference.json: transformers'
                    SiglipTokenizer(...)(text, padding="max_length",
                    truncation=True, max_length=16) "input_ids" and
                    "attention_mask" of "texts" (upper case, accents,
                    emoji, punctuation, whitespace, special-token strings,
                    empty, over-long) and SiglipModel's "text_embeds" of
                    those ids.
  timm_vit_tiny/    timm VisionTransformer(img_size=32, patch_size=8,
                    embed_dim=32, depth=2, num_heads=4, num_classes=0):
                    model.safetensors and a config.json in timm's Hugging
                    Face Hub layout (architecture, num_classes, global_pool,
                    model_args); reference.npz: "pixels" uint8
                    [3, 32, 32, 3], "features" float32 [3, 32] =
                    forward_features(x)[:, 0] (after the final norm), the
                    input normalised with ImageNet's mean and std.

tests/test_siglip.py and tests/test_vit_checkpoints.py check mmjax against
them without torch.
"""

import json
import pathlib

import io
import re
import string
import sys

import numpy as np

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def perturb(model, seed):
  import torch  # pylint: disable=import-outside-toplevel
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=generator))


def normalised(images, mean, std):
  import torch  # pylint: disable=import-outside-toplevel
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.tensor(x.transpose(0, 3, 1, 2))


def write_siglip(directory: pathlib.Path):
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import SiglipConfig, SiglipModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  config = SiglipConfig(
      text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, pad_token_id=1,
                       bos_token_id=None, eos_token_id=1),
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         image_size=64, patch_size=16))
  model = SiglipModel(config).eval()
  perturb(model, 0)
  model.save_pretrained(directory)
  images = np.load(ROOT / "data/coco_mini/images.npz")["images"][:4]
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 100, (6, 16)).astype(np.int32)
  ids[1, 5:], ids[2, 12:], ids[4, 1:] = 1, 1, 1  # padded rows
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                pixel_values=normalised(images, (0.5,) * 3, (0.5,) * 3))
  np.savez(directory / "reference.npz", pixels=images, ids=ids,
           image_embeds=out.image_embeds.numpy(),
           text_embeds=out.text_embeds.numpy(),
           logit_scale=model.logit_scale.detach().numpy().reshape(()),
           logit_bias=model.logit_bias.detach().numpy().reshape(()))
  write_siglip_tokenizer(directory)


SIGLIP_TEXTS = [
    "A man riding a wave on top of a surfboard.", "a", "Ünïcödé café",
    "two dogs 🐶🐶 playing", "THE QUICK BROWN FOX",
    "a photo of " + "very " * 40 + "long text", "", "it's 3 o'clock",
    "  spaces\tand\nnewlines  ", "...!?", "a cat </s> on a mat", "<unk>",
    "x</s>", "</s>", "\u2581a\u2581b", "Hello, World! (1999)",
    "A kitchen with a stove and a sink", "people standing on a street",
    "a pizza on a plate on a table next to a laptop", "日本語のテキスト"]
SIGLIP_LENGTH = 16


def canonical(text):  # SiglipTokenizer.canonicalize_text
  text = text.lower().translate(str.maketrans("", "", string.punctuation))
  return re.sub(r"\s+", " ", text).strip()


def write_siglip_tokenizer(directory: pathlib.Path):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import SiglipModel, SiglipTokenizer  # pylint: disable=import-outside-toplevel
  captions = [canonical(c)
              for line in (ROOT / "data/coco_mini/captions.jsonl").open()
              for c in json.loads(line)["captions"]]
  vocab_size = json.loads((directory / "config.json").read_text())[
      "text_config"]["vocab_size"]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_writer=model,
      vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
      unk_piece="<unk>", character_coverage=1.0,
      normalization_rule_name="identity", num_threads=1, minloglevel=2)
  (directory / "spiece.model").write_bytes(model.getvalue())
  tokenizer = SiglipTokenizer.from_pretrained(directory)
  encoded = [tokenizer(t, padding="max_length", truncation=True,
                       max_length=SIGLIP_LENGTH) for t in SIGLIP_TEXTS]
  ids = [e["input_ids"] for e in encoded]
  siglip = SiglipModel.from_pretrained(directory).eval()
  with torch.no_grad():
    embeds = siglip.get_text_features(input_ids=torch.tensor(ids))
    embeds = getattr(embeds, "pooler_output", embeds)
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
  reference = {"max_length": SIGLIP_LENGTH, "texts": SIGLIP_TEXTS,
               "input_ids": ids,
               "attention_mask": [e["attention_mask"] for e in encoded],
               "text_embeds": embeds.numpy().astype(float).round(7).tolist()}
  lines = []  # one row a line
  for key, value in reference.items():
    rows = (",\n  ".join(json.dumps(v, ensure_ascii=False) for v in value)
            if isinstance(value, list) else None)
    lines.append(f'"{key}": ' + (f"[\n  {rows}]" if rows is not None
                                 else json.dumps(value)))
  (directory / "tokenizer_reference.json").write_text(
      "{" + ",\n".join(lines) + "}\n", encoding="utf-8")


def write_timm(directory: pathlib.Path):
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  model_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                    num_heads=4, mlp_ratio=2.0, num_classes=0)
  model = VisionTransformer(**model_args).eval()
  perturb(model, 1)
  safetensors.torch.save_file(
      {k: v.contiguous() for k, v in model.state_dict().items()},
      str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(
      {"architecture": "vit_tiny_test", "num_classes": 0,
       "num_features": 32, "global_pool": "token", "model_args": model_args,
       "pretrained_cfg": {"input_size": [3, 32, 32], "mean": IMAGENET_MEAN,
                          "std": IMAGENET_STD}}, indent=2))
  images = np.load(ROOT / "data/coco_mini/images.npz")["images"][4:7]
  images = images[:, ::2, ::2]  # 64 -> 32
  with torch.no_grad():
    features = model.forward_features(
        normalised(images, IMAGENET_MEAN, IMAGENET_STD))[:, 0]
  np.savez(directory / "reference.npz", pixels=np.ascontiguousarray(images),
           features=features.numpy())


def main():
  if sys.argv[1:] == ["tokenizer"]:
    write_siglip_tokenizer(HERE / "siglip_tiny_hf")
    print("wrote", HERE / "siglip_tiny_hf" / "spiece.model")
    return
  for name, write in (("siglip_tiny_hf", write_siglip),
                      ("timm_vit_tiny", write_timm)):
    directory = HERE / name
    directory.mkdir(exist_ok=True)
    write(directory)
    print("wrote", directory)


if __name__ == "__main__":
  main()
