"""Zero-shot ImageNet classification by a loaded CLIP checkpoint, with CLIP's
1000 class names and 80-template prompt ensemble (`mmjax.data.imagenet`).

Command (clip=DIR: a Hugging Face CLIPModel or open_clip checkpoint
directory, `mmjax.models.clip`; on a connected machine e.g.
`huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR`):
  python -m mmjax.train --config configs/zero_shot_imagenet.py:clip=DIR \
      --workdir /tmp/zs_imagenet
  python -m mmjax.evaluate --config configs/zero_shot_imagenet.py:clip=DIR \
      --workdir /tmp/zs_imagenet   # again, from the saved checkpoint

The trainer needs total_steps >= 1, so the run takes ONE step that changes
nothing: every parameter is frozen ("frozen": ".*", optax.set_to_zero) and
the learning rate is 0, on one batch of the evaluated split (prompts from
the templates, as LiT-style training makes them). It then saves that
checkpoint (the CLIP weights as loaded) and evaluates: metrics.jsonl and the
log get `eval/imagenet2012_validation/zero_shot/accuracy` (top-1).
In Python, without the step: `run = experiment.build(config,
training=False); run.evaluate(run.state)`.

Data (tfds catalogue, array_record format, under $TFDS_DATA_DIR or
--config.data_dir; `mmjax.data.pipeline`), prepared on a connected machine:
  imagenet2012 (split validation, 50,000 images): download
    ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org
    (registration) into a manual dir, then
    tfds build imagenet2012 --file_format=array_record --manual_dir=DIR
  imagenet_v2 (split test, 10,000 images; matched-frequency) downloads
    itself: tfds build imagenet_v2 --file_format=array_record
Images are resized (shorter side, bicubic) to the checkpoint's image size
and centre-cropped, as CLIP's evaluation preprocessing.

Arguments (comma list after the colon):
  clip=DIR          the checkpoint (required): architecture, weights and
                    tokenizer (DIR/tokenizer.json); image size and text
                    length follow it.
  dataset=NAME      imagenet2012 (default; split validation) or imagenet_v2
                    (split test).
  batch=N           evaluation batch size (default 256; divisible by the
                    device count).

Expected result: a real ViT-B/32 CLIP (openai/clip-vit-base-patch32) should
give about 63% top-1 on ImageNet validation with these 80 templates
(Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, report 63.2% for ViT-B/32) and about 56% on
ImageNet-V2 (the source notebook's own output: 55.93% top-1 with ViT-B/32 on
ImageNetV2 matched-frequency); small differences from CLIP's torchvision
preprocessing are possible. Not run here (no ImageNet, no CLIP weights and
no network on the machines this was written on). The tiny test checkpoint
(tests/data/clip_tiny_hf, random weights) gives chance, about 0.1%.
Runtime (estimated, not measured): the 80,000 prompts (1000 classes x 80
templates) are embedded by the text tower in one call (`mmjax.evaluators`
embeds a `prompts` option in a single batch): seconds on one large GPU for
ViT-B/32, but its activations take tens of GB (at 77 tokens the MLP's
[80000, 77, 2048] float32 hidden alone is 50 GB), so a smaller GPU may run
out of memory, and on CPU it takes hours (even the tiny test model was
killed at 23.6 GB with 8 simulated CPU devices; the test uses 2 templates); then 50,000 validation images
through a ViT-B/32 take a few minutes on one GPU, the input pipeline (JPEG
decoding and resizing on the host) being the bound. The test
(tests/test_zero_shot_imagenet.py, tfds mock data) runs on CPU.
"""

import ml_collections

from mmjax import configs
from mmjax.configs import common
from mmjax.data import imagenet
from mmjax.errors import UsageError
from mmjax.models.clip_config import clip_config

# tfds catalogue name (its version named, so that tfds reads the prepared
# files, `mmjax.data.pipeline.data_source`) and evaluated split.
DATASETS = {
    "imagenet2012": ("tfds:imagenet2012:5.1.0", "validation"),
    "imagenet_v2": ("tfds:imagenet_v2/matched-frequency:3.0.0", "test"),
}


def get_config(arg=None):
  args = common.parse_arg(arg, clip=None, dataset="imagenet2012", batch=256)
  if not args.clip:
    raise UsageError("configs/zero_shot_imagenet.py needs clip=DIR, a CLIP "
                     "checkpoint directory")
  configs.check_choice("config argument dataset", args.dataset, DATASETS)
  try:
    checkpoint = clip_config(args.clip)
  except (OSError, ValueError) as e:
    raise UsageError(f"config argument 'clip': {e}") from e
  dataset, split = DATASETS[args.dataset]
  class_names, templates = imagenet.class_names(), imagenet.templates()
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: the evaluated split at the checkpoint's image size. The one
  # (frozen, zero learning rate) training step reads the same split.
  common.set_data(config, dataset, modalities=("image", "text"),
                  eval_splits=(split,), train_split=split)
  config.image_size = checkpoint["image_size"]
  config.text = ml_collections.ConfigDict()
  config.text.tokenizer = f"clip:{args.clip}"
  config.text.max_length = checkpoint["max_length"]
  config.text.class_names = class_names
  config.text.templates = templates
  config.evaluators = {"zero_shot": {
      "modality": "image",
      "prompts": {"class_names": class_names, "templates": templates}}}

  # Model: the checkpoint's towers and temperature, all frozen.
  config.objective = "softmax"
  config.model = ml_collections.ConfigDict(checkpoint["model"])
  config.model.init = {path: f"clip:{args.clip}"
                       for path in ("tower_image", "tower_text", "log_scale")}
  config.frozen = ".*"

  # One step that changes nothing, then the checkpoint and the evaluation.
  common.set_training(config, batch_size=8, steps=1, smoke=False,
                      log_every=1, eval_batch_size=args.batch,
                      checkpoint_every=1)
  config.optimizer.learning_rate = 0.0
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = "constant"
  config.keep_checkpoints = 1
  return config
