"""`suti convert diffusers --src DIR --out CKPT`: a local diffusers Stable Diffusion folder as one checkpoint.

  suti convert diffusers --src /models/stable-diffusion-v1-5 --out /ckpt/sd15 [--config configs/sd15.py]
  suti generate --checkpoint /ckpt/sd15 --prompt "a photo of a dog on the beach" --out dog.png

The UNet, the VAE (AutoencoderKL), the CLIP text encoder with its tokenizer and the scheduler's settings go into
one checkpoint in the layout `suti export` writes (CKPT/0/params, CKPT/0/meta, and CKPT/tokenizer/), so
`suti generate`, `suti eval`, `train.init_from` and the experts' `base_checkpoint` read it like any other. The
config stored with it is --config's (training, mesh and data settings), with the model, text, vae and diffusion
sections replaced by the pipeline's: the UNet shape from unet/config.json, the VAE from vae/config.json, CLIP's
shape, and the scheduler's beta schedule, prediction type, timestep spacing, steps offset and set_alpha_to_one,
which the project's DDIM follows. Nothing is trained or changed: generation from the same initial latents gives
diffusers' StableDiffusionPipeline image.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import jax
import ml_collections as mlc
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import load_file

from suti.checkpoint.diffusers_pipeline import DiffusersPipeline, read_pipeline, read_scheduler
from suti.checkpoint.export import clear_checkpoint_folder, save_weights, with_own_tokenizer
from suti.checkpoint.store import checkpoint_config, load_meta
from suti.config import load_config
from suti.core.atomic_io import read_json_object
from suti.core.errors import CommandParser, run_user_command
from suti.models.clip_text import CLIPTextConfig
from suti.models.convert_diffusers import convert_diffusers_unet, unet_config_from_diffusers
from suti.models.convert_hf_text import load_clip_text, read_hf_config
from suti.models.convert_vae import convert_diffusers_vae, vae_config_from_diffusers
from suti.models.diffusers_layout import safetensors_file
from suti.models.model import vae_config
from suti.models.unet_config import UNetConfig

DEFAULT_CONFIG = "configs/sd15.py"


def _plain(value: Any) -> Any:
  """Dataclass values as a config stores them (lists become tuples, as the config files write them)."""
  return tuple(value) if isinstance(value, list) else value


def _fitting_resolutions(resolutions: Sequence[int], unet: UNetConfig) -> tuple[int, ...]:
  """The configured neighbor resolutions this UNet has (a later apprentice of it adds neighbors there)."""
  sizes = {unet.image_size // 2**level for level in range(unet.num_levels)}
  return tuple(r for r in resolutions if r in sizes)


def model_section(pipeline: DiffusersPipeline, base: dict) -> dict:
  """The pipeline's UNet as the `model` section; SuTI's own fields (neighbors, dtype) from `base`."""
  unet = unet_config_from_diffusers(pipeline.component("unet"), dtype=base.get("dtype", "float32"),
                                    neighbor_timestep=int(base.get("neighbor_timestep", 0)))
  unet = unet.replace(
      neighbor_token_resolutions=_fitting_resolutions(base.get("neighbor_token_resolutions", ()), unet),
      neighbor_attn_resolutions=_fitting_resolutions(base.get("neighbor_attn_resolutions", ()), unet))
  section = {f.name: _plain(getattr(unet, f.name)) for f in dataclasses.fields(unet)}
  return dict(section, pretrained=base.get("pretrained", ""))


def text_section(pipeline: DiffusersPipeline, base: dict) -> dict:
  """CLIP's shape and the pipeline's tokenizer, run as Stable Diffusion runs it (every position, unmasked)."""
  clip = CLIPTextConfig.from_hf(read_hf_config(pipeline.component("text_encoder")))
  tokenizer = pipeline.component("tokenizer")
  tokenizer_config = os.path.join(tokenizer, "tokenizer_config.json")
  max_length = clip.max_position_embeddings
  if os.path.isfile(tokenizer_config):
    max_length = min(max_length, int(read_json_object(tokenizer_config).get("model_max_length", max_length)))
  clip_config = {f.name: getattr(clip, f.name) for f in dataclasses.fields(clip) if f.name != "dtype"}
  return dict(base, kind="clip", checkpoint="", clip_config=clip_config, tokenizer=tokenizer,
              max_length=max_length, width=clip.hidden_size, trainable=False, mask_padding=False)


def pipeline_config(pipeline: DiffusersPipeline, base: dict) -> dict:
  """`base` (a config as a dict) with the model, text, vae and diffusion sections of the pipeline."""
  vae = vae_config_from_diffusers(pipeline.component("vae"))
  config = dict(base)
  config["model"] = model_section(pipeline, base["model"])
  config["text"] = text_section(pipeline, base["text"])
  config["vae"] = {"enabled": True, **{k: _plain(v) for k, v in vae.to_dict().items()}}
  config["diffusion"] = dict(base["diffusion"], **read_scheduler(pipeline))
  config["sample"] = dict(base["sample"], dynamic_threshold=0.0)  # latents: no pixel thresholding
  return config


def pipeline_weights(pipeline: DiffusersPipeline, config: dict) -> dict:
  """The pipeline's UNet, VAE and CLIP weights at the paths of SuTIModel (nnx pure dicts, float32), shaped by
  `config` (pipeline_config's)."""
  unet = convert_diffusers_unet(load_file(safetensors_file(pipeline.component("unet"))),
                                UNetConfig.from_config(config["model"]))
  vae = convert_diffusers_vae(load_file(safetensors_file(pipeline.component("vae"))),
                              vae_config(mlc.ConfigDict(config)))
  clip = load_clip_text(pipeline.component("text_encoder"))
  return {"unet": unet.to_pure_dict(), "vae": vae.to_pure_dict(),
          "text": {"model": nnx.state(clip, nnx.Param).to_pure_dict()}}


def convert_pipeline(src: str, out_dir: str, *, config: str | dict = DEFAULT_CONFIG, overwrite: bool = False) -> str:
  """Converts the diffusers pipeline folder `src` into a checkpoint in `out_dir`, its config `config`'s (a file,
  or a config as a dict) with the pipeline's sections; returns the checkpoint's step folder."""
  pipeline = read_pipeline(src)
  out = clear_checkpoint_folder(out_dir, overwrite)
  cfg = pipeline_config(pipeline, config if isinstance(config, dict) else load_config(config).to_dict())
  weights = pipeline_weights(pipeline, cfg)
  os.makedirs(out, exist_ok=True)
  cfg = with_own_tokenizer(cfg, out)
  meta = {"config": cfg, "converted_from": pipeline.folder, "classes": pipeline.classes, "weights": "diffusers"}
  return save_weights(out, 0, weights, meta)


PRETRAINED_DIR = "pretrained"  # <workdir>/pretrained: model.pretrained converted once per run


def with_pretrained(cfg: mlc.ConfigDict, workdir: str) -> mlc.ConfigDict:
  """`cfg` itself when model.pretrained is empty; else the run's config from that local diffusers folder: converted
  once into <workdir>/pretrained (by process 0; the others wait), the model, text, vae and diffusion sections taken
  from it (the run's own neighbor settings kept, so an apprentice adds its layers), and train.init_from set to it."""
  source = cfg.model.get("pretrained", "")
  if not source:
    return cfg
  if cfg.train.get("init_from", ""):
    raise ValueError("model.pretrained and train.init_from both name starting weights: give one of them")
  target = os.path.join(workdir, PRETRAINED_DIR)
  if jax.process_index() == 0 and not os.path.isfile(os.path.join(target, "DONE")):
    convert_pipeline(source, target, config=cfg.to_dict(), overwrite=True)
    open(os.path.join(target, "DONE"), "w").close()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("suti:pretrained converted")
  converted = checkpoint_config(load_meta(target), f"model.pretrained {source} as converted in {target}")
  out = cfg.to_dict()
  for section in ("model", "text", "vae", "diffusion", "sample"):
    out[section] = converted[section].to_dict()
  out["model"]["num_neighbors"] = int(cfg.model.num_neighbors)
  out["train"] = dict(out["train"], init_from=target)
  return mlc.ConfigDict(out)


def with_init_text(cfg: mlc.ConfigDict) -> mlc.ConfigDict:
  """`cfg` with the CLIP text encoder of its train.init_from checkpoint when its own `text` section names none
  (text.kind clip, no text.checkpoint, no clip_config: configs/sd15.py as it ships), so `--config.train.init_from`
  a converted Stable Diffusion checkpoint is enough; the run's text.trainable is kept. Else `cfg` itself."""
  text = cfg.text
  if not cfg.train.get("init_from", "") or text.kind != "clip" or text.get("checkpoint", "") or text.get("clip_config"):
    return cfg
  init = checkpoint_config(load_meta(cfg.train.init_from), f"train.init_from {cfg.train.init_from}")
  if init.text.kind != "clip" or not init.text.get("clip_config"):
    return cfg  # the text encoder's own error then says what is missing
  out = cfg.to_dict()
  out["text"] = dict(init.text.to_dict(), trainable=bool(text.trainable))
  return mlc.ConfigDict(out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = CommandParser(prog="suti convert", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="source", required=True)
  diffusers = sub.add_parser("diffusers", help="a local diffusers StableDiffusionPipeline folder")
  diffusers.add_argument("--src", required=True, help="the folder (model_index.json, unet/, vae/, text_encoder/, "
                                                      "tokenizer/, scheduler/)")
  diffusers.add_argument("--out", required=True, help="the checkpoint folder to write")
  diffusers.add_argument("--config", default=DEFAULT_CONFIG,
                         help="the config whose training, data and mesh settings the checkpoint keeps")
  diffusers.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  path = convert_pipeline(args.src, args.out, config=args.config, overwrite=args.overwrite)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
  print(f"suti convert: {args.src} -> {path} ({size / 1e6:.1f} MB)")
  return 0


if __name__ == "__main__":
  sys.exit(run_user_command(main, sys.argv[1:], "suti convert"))
