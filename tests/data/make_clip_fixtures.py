"""Writes the tiny CLIP checkpoints of tests/data (needs the convert extra
and open_clip: pip install -e ".[convert]" open_clip_torch).

  python tests/data/make_clip_fixtures.py

Both are randomly initialised by their reference library, from configs
alone (nothing is downloaded), and saved in that library's own format:

  clip_tiny_hf/         transformers' CLIPModel.save_pretrained (config.json,
                        model.safetensors), with tokenizer.json
  clip_tiny_open_clip/  open_clip's CLIP: open_clip_config.json and
                        open_clip_model.safetensors (open_clip's Hugging Face
                        Hub layout), with tokenizer.json

The tokenizer is CLIP's pipeline (NFC, whitespace collapsed, lower case,
CLIP's split pattern, byte-level BPE with "</w>" word ends, the text between
<|startoftext|> and <|endoftext|>, the end token the largest id) trained by
`tokenizers` on the coco_mini captions (data/coco_mini, CC BY / CC BY-SA) to
a 600-token vocabulary. Each directory's reference.npz holds the references'
outputs on 4 coco_mini images and 8 texts: "pixels" uint8 [4, 64, 64, 3],
"ids" int32 [8, 32] (the reference tokeniser's, padded with the end token),
"image_embeds" and "text_embeds" float32 [4 or 8, 24] (L2-normalised), and
"logit_scale". tests/test_clip.py checks mmjax against them without torch.
"""

import json
import pathlib

import numpy as np
import safetensors.torch
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation pattern (its tokenizer.json's Split).
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|"
                r"'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
TEXTS = ["A man riding a wave on top of a surfboard.", "a", "Ünïcödé café",
         "two dogs 🐶🐶 playing", "THE QUICK BROWN FOX",
         "a photo of " + "very " * 40 + "long text", "", "it's 3 o'clock"]
LENGTH, SIDE, EMBED = 32, 64, 24


def train_tokenizer(path: pathlib.Path) -> tokenizers.Tokenizer:
  captions = [c for line in (ROOT / "data/coco_mini/captions.jsonl").open()
              for c in json.loads(line)["captions"]]
  tok = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(CLIP_PATTERN), "removed",
                           invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=598, end_of_word_suffix="</w>",
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(captions, trainer)
  tok.add_special_tokens([BOS, EOS])  # the two largest ids, as in CLIP
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}",
      special_tokens=[(BOS, tok.token_to_id(BOS)),
                      (EOS, tok.token_to_id(EOS))])
  tok.save(str(path))
  return tok


def reference_inputs(tok):
  images = np.load(ROOT / "data/coco_mini/images.npz")["images"][:4]
  eos = tok.token_to_id(EOS)
  ids = np.full((len(TEXTS), LENGTH), eos, np.int32)
  for i, encoding in enumerate(tok.encode_batch(TEXTS)):
    row = encoding.ids
    if len(row) > LENGTH:  # CLIP's cut: keep the end token
      row = row[:LENGTH - 1] + [eos]
    ids[i, :len(row)] = row
  return images, ids


def normalised(images, mean, std):
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.tensor(x.transpose(0, 3, 1, 2))


def write_hf(directory: pathlib.Path, tok):
  from transformers import CLIPConfig, CLIPModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  eos = tok.token_to_id(EOS)
  config = CLIPConfig(
      text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=LENGTH,
                       bos_token_id=tok.token_to_id(BOS), eos_token_id=eos,
                       pad_token_id=eos),
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         image_size=SIDE, patch_size=16),
      projection_dim=EMBED)
  model = CLIPModel(config).eval()
  model.save_pretrained(directory)
  images, ids = reference_inputs(tok)
  mean = (0.48145466, 0.4578275, 0.40821073)
  std = (0.26862954, 0.26130258, 0.27577711)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                pixel_values=normalised(images, mean, std))
  np.savez(directory / "reference.npz", pixels=images, ids=ids,
           image_embeds=out.image_embeds.numpy(),
           text_embeds=out.text_embeds.numpy(),
           logit_scale=model.logit_scale.detach().numpy())


def write_open_clip(directory: pathlib.Path, tok):
  import open_clip  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  model_cfg = dict(
      embed_dim=EMBED, quick_gelu=False,
      vision_cfg=dict(image_size=SIDE, layers=2, width=32, head_width=8,
                      patch_size=16, mlp_ratio=2.0),
      text_cfg=dict(context_length=LENGTH, vocab_size=tok.get_vocab_size(),
                    width=32, heads=4, layers=2, mlp_ratio=2.0))
  model = open_clip.model.CLIP(**model_cfg).eval()
  directory.mkdir(exist_ok=True)
  (directory / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": model_cfg,
       "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                          "std": list(open_clip.OPENAI_DATASET_STD)}},
      indent=2))
  safetensors.torch.save_file(
      {k: v.contiguous() for k, v in model.state_dict().items()},
      str(directory / "open_clip_model.safetensors"))
  images, ids = reference_inputs(tok)
  with torch.no_grad():
    image = model.encode_image(normalised(
        images, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
                               normalize=True)
    text = model.encode_text(torch.tensor(ids, dtype=torch.long),
                             normalize=True)
  np.savez(directory / "reference.npz", pixels=images, ids=ids,
           image_embeds=image.numpy(), text_embeds=text.numpy(),
           logit_scale=model.logit_scale.detach().numpy())


def main():
  for name, write in (("clip_tiny_hf", write_hf),
                      ("clip_tiny_open_clip", write_open_clip)):
    directory = HERE / name
    directory.mkdir(exist_ok=True)
    write(directory, train_tokenizer(directory / "tokenizer.json"))
    print("wrote", directory)


if __name__ == "__main__":
  main()
