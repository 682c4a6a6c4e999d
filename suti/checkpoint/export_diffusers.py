"""`suti export --format diffusers --checkpoint CKPT --out DIR`: a latent base model as a diffusers
StableDiffusionPipeline folder, which diffusers loads with `from_pretrained` and samples with its own pipeline.

Written: model_index.json, unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), text_encoder/ (CLIPTextModel) and
tokenizer/ (the checkpoint's own), scheduler/ (a DDIMScheduler with the checkpoint's noise schedule and sampling
settings). The inverse of `suti convert diffusers`: converting the folder back gives the same weights. A pixel
model, an apprentice (its neighbor layers), the embedded text encoder or pooled text in the time embedding have no
diffusers counterpart: one-line errors say which.
"""
from __future__ import annotations

import os
import shutil

from safetensors.numpy import save

from suti.checkpoint.diffusers_pipeline import scheduler_from_diffusion
from suti.core.atomic_io import atomic_write_bytes, atomic_write_json
from suti.models.convert_diffusers import diffusers_unet_config, diffusers_unet_state_dict
from suti.models.convert_hf_text import clip_text_state_dict, hf_clip_text_config
from suti.models.convert_vae import save_diffusers_vae
from suti.models.model import SuTIModel


def _model_index() -> dict:
  return {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
          "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
          "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
          "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
          "requires_safety_checker": False}


def check_exportable(model: SuTIModel, cfg) -> None:
  if model.vae is None:
    raise ValueError("a diffusers StableDiffusionPipeline is a latent model: this checkpoint has no VAE "
                     "(vae.enabled is off)")
  if cfg.text.kind != "clip":
    raise ValueError(f"a diffusers StableDiffusionPipeline takes a CLIP text encoder, this checkpoint has "
                     f"text.kind={cfg.text.kind!r}")
  diffusers_unet_config(model.unet_config)  # pooled text, neighbors: the UNet's own errors


def export_pipeline(model: SuTIModel, cfg, out_dir: str) -> str:
  """Writes `model` (a latent base model with CLIP text) as a diffusers pipeline folder; returns it."""
  check_exportable(model, cfg)
  os.makedirs(out_dir, exist_ok=True)
  unet_dir, text_dir = os.path.join(out_dir, "unet"), os.path.join(out_dir, "text_encoder")
  os.makedirs(unet_dir, exist_ok=True)
  os.makedirs(text_dir, exist_ok=True)
  atomic_write_bytes(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"),
                     save(diffusers_unet_state_dict(model.unet)))
  atomic_write_json(os.path.join(unet_dir, "config.json"), diffusers_unet_config(model.unet_config))
  save_diffusers_vae(model.vae, os.path.join(out_dir, "vae"))
  atomic_write_bytes(os.path.join(text_dir, "model.safetensors"), save(clip_text_state_dict(model.text.model)))
  atomic_write_json(os.path.join(text_dir, "config.json"), hf_clip_text_config(model.text.model.config))
  shutil.copytree(model.text.tokenizer.folder, os.path.join(out_dir, "tokenizer"), dirs_exist_ok=True)
  os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
  atomic_write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"),
                    scheduler_from_diffusion(cfg.diffusion.to_dict()))
  atomic_write_json(os.path.join(out_dir, "model_index.json"), _model_index())
  return os.path.abspath(out_dir)


def clear_pipeline_folder(out_dir: str, overwrite: bool) -> None:
  if os.path.isfile(os.path.join(out_dir, "model_index.json")):
    if not overwrite:
      raise ValueError(f"{out_dir} already holds a diffusers pipeline (pass --overwrite to replace it)")
    for name in os.listdir(out_dir):
      path = os.path.join(out_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
