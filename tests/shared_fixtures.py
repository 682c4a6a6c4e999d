"""Helpers shared by several test files (imported as a plain module: pytest puts tests/ on sys.path)."""
import glob
import json
import os
import tarfile

import numpy as np
import pytest

from suti.config import load_config
from suti.models.unet_config import UNetConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class LazyImport:
  """A module imported on first attribute access, through pytest.importorskip (a test that uses it skips when it
  is not installed). For the PyTorch references (torch, transformers, diffusers: ~3.5 s to import): every xdist
  worker collects every test file, and only the worker that runs a file's tests should pay for them."""

  def __init__(self, name: str):
    self._name = name
    self._module = None

  def __getattr__(self, attr: str):
    if self._module is None:
      self._module = pytest.importorskip(self._name)
    return getattr(self._module, attr)


def tiny_unet_config(**changes) -> UNetConfig:
  """The toy UNet shrunk to two levels (8x8 and a 4x4 mid block), for fast model tests."""
  m = load_config(os.path.join(CONFIGS, "toy.py")).model
  m.image_size = 8
  m.block_out_channels = (16, 32)
  m.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
  m.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
  m.num_attention_heads = 2
  m.cross_attention_dim = 16
  m.norm_num_groups = 4
  return UNetConfig.from_config(m).replace(**changes)


def read_truth(web: str) -> dict[str, dict]:
  """key -> the toy ground truth (+ page_url) from a toy web's sample JSON. Tests only: the pipeline never
  reads the "toy" key."""
  truth = {}
  for path in sorted(glob.glob(os.path.join(web, "*.tar"))):
    with tarfile.open(path) as tar:
      for m in tar:
        if m.name.endswith(".json"):
          meta = json.loads(tar.extractfile(m).read())
          truth[meta["key"]] = dict(meta["toy"], page_url=meta.get("page_url"))
  return truth


TINY_MODEL_OVERRIDES = (
    ("model.image_size", "8"), ("model.block_out_channels", "(16, 32)"),
    ("model.down_block_types", "('DownBlock2D', 'CrossAttnDownBlock2D')"),
    ("model.up_block_types", "('CrossAttnUpBlock2D', 'UpBlock2D')"),
    ("model.num_attention_heads", "2"), ("model.cross_attention_dim", "16"), ("model.norm_num_groups", "4"),
    ("text.width", "16"), ("text.layers", "1"), ("text.heads", "2"), ("text.max_length", "16"),
)


# A latent model for the tiny UNet: 8x8x4 latents of a 2-level VAE (8 and 16 channels), 16x16 images.
TINY_LATENT_OVERRIDES = (
    ("vae.enabled", "True"), ("vae.block_out_channels", "(8, 16)"), ("vae.norm_num_groups", "4"),
    ("vae.sample_size", "16"), ("model.in_channels", "4"), ("model.out_channels", "4"),
    ("sample.dynamic_threshold", "0.0"),
)


def tiny_config(name: str = "toy.py", overrides=()):
  """A full training config (configs/<name>) with the model shrunk to two levels at 8x8: trains in seconds."""
  return load_config(os.path.join(CONFIGS, name), list(TINY_MODEL_OVERRIDES) + list(overrides))


def byte_tokenizer(length: int):
  """A stand-in tokenizer for loader tests: utf-8 bytes, cut at `length`, zero-padded; mask = nonzero."""
  def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      data = text.encode("utf-8")[:length]
      ids[row, :len(data)] = np.frombuffer(data, np.uint8)
    return ids, ids > 0
  return tokenize


def detokenize(ids: np.ndarray) -> str:
  return bytes(int(i) for i in ids if i > 0).decode("utf-8")


def write_tiny_checkpoint(out_dir: str, config_name: str = "toy_suti.py", *, seed: int = 0,
                          live_neighbors: bool = False, overrides=()) -> str:
  """An untrained tiny model (tiny_config) saved as a weights checkpoint in `out_dir`, as `suti export` writes one.

  live_neighbors: the zero-initialised output projections of the neighbor attention get random values, so the
  demos change the output (a fresh apprentice ignores them by construction)."""
  import jax
  from flax import nnx

  from suti.models.model import SuTIModel
  from suti.checkpoint.export import save_weights
  cfg = tiny_config(config_name, overrides)
  model = SuTIModel(cfg, rngs=nnx.Rngs(seed))
  weights = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if live_neighbors:
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
      names = [str(getattr(p, "key", p)) for p in path]
      if any("neighbor" in n for n in names) and "to_out" in names:
        return np.asarray(rng.normal(0, 0.3, np.shape(leaf)), np.float32)
      return np.asarray(leaf)
    weights = jax.tree_util.tree_map_with_path(perturb, weights)
  return save_weights(out_dir, 1, weights, {"config": json.loads(cfg.to_json_best_effort())})


# The trainer tests' run settings (batch 8, a metrics line per step, no preview samples, a small shuffle buffer).
TINY_RUN = (("train.batch_size", "8"), ("train.log_every", "1"), ("train.warmup_steps", "2"), ("train.lr", "1e-3"),
            ("train.sample_every", "0"), ("data.shuffle_buffer", "16"), ("data.prefetch", "1"))
TINY_BASE_RUN = TINY_RUN + (("train.steps", "3"), ("train.checkpoint_every", "3"))


def tiny_base_workdir(workdir: str) -> str:
  """`workdir` holding a finished tiny base run (made on the first call, reused after): a 6-page toy web and
  3 training steps of tiny_config. The conftest's `tiny_base_run` fixture shares it across test files."""
  from suti.toy.web import write_toyweb
  from suti.train.trainer import train

  done = os.path.join(workdir, "DONE")
  if not os.path.exists(done):
    web = os.path.join(workdir, "web")
    write_toyweb(web, pages=6, seed=0, image_size=16, benchmark_per_class=0)
    train(tiny_config(overrides=list(TINY_BASE_RUN) + [("data.shards", os.path.join(web, "*.tar"))]),
          os.path.join(workdir, "run"), progress=False)
    open(done, "w").close()
  return os.path.join(workdir, "run")
