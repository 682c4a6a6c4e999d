"""Reading a diffusers Stable Diffusion pipeline folder: which components it has, whether the project can take
each of them, and its scheduler config in the project's `diffusion` terms.

The first half of `suti convert diffusers` (the conversion into one checkpoint builds on it). Every problem is
a one-line ValueError that names the folder, the component and what was found.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from suti.core.atomic_io import read_json_object

# component -> the classes the project converts (diffusers / transformers class names in model_index.json).
SUPPORTED_COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                  "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler"),
}

# diffusers beta_schedule -> the project's diffusion.schedule ("squaredcos_cap_v2" is the cosine schedule of
# improved DDPM, betas capped at 0.999: what suti.diffusion.schedules.cosine_schedule computes).
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
# The value of each scheduler option the project does not implement that means "off".
_SCHEDULER_OFF = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False,
                  "timestep_type": "discrete"}
# set_alpha_to_one's default when a scheduler config omits it (DDIM's is True, PNDM's False).
_ALPHA_TO_ONE_DEFAULTS = {"DDIMScheduler": True, "PNDMScheduler": False}


@dataclass(frozen=True)
class DiffusersPipeline:
  """The folder of a diffusers pipeline and the class of each component the project converts."""
  folder: str
  classes: dict[str, str]

  def component(self, name: str) -> str:
    return os.path.join(self.folder, name)


def read_pipeline(folder: str) -> DiffusersPipeline:
  """Reads model_index.json and checks that every component the project needs is there and of a kind it takes."""
  index_file = os.path.join(folder, "model_index.json")
  if not os.path.isdir(folder):
    raise ValueError(f"{folder} is not a folder")
  if not os.path.isfile(index_file):
    raise ValueError(f"{folder} is not a diffusers pipeline: it has no model_index.json")
  index = read_json_object(index_file)
  classes = {}
  for name, supported in SUPPORTED_COMPONENTS.items():
    entry = index.get(name)
    if not entry:
      raise ValueError(f"the diffusers pipeline in {folder} has no {name} component (model_index.json)")
    kind = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if kind not in supported:
      raise ValueError(f"the diffusers pipeline in {folder} has a {name} of kind {kind!r}, which the project "
                       f"cannot take (it takes {', '.join(supported)})")
    if not os.path.isdir(os.path.join(folder, name)):
      raise ValueError(f"the diffusers pipeline in {folder} lists a {name} but has no {name}/ folder")
    classes[name] = kind
  return DiffusersPipeline(os.path.abspath(folder), classes)


def diffusion_from_scheduler(config: Mapping[str, Any]) -> dict[str, Any]:
  """A diffusers scheduler config -> the project's `diffusion` settings that reproduce its noise schedule and the
  way DDIM walks it (schedule, num_timesteps, beta_start, beta_end, prediction, timestep_spacing, steps_offset,
  set_alpha_to_one). One-line errors for what the project cannot reproduce."""
  kind = config.get("_class_name", "DDIMScheduler")
  for key, off in _SCHEDULER_OFF.items():
    value = config.get(key)
    if value is not None and value != off:
      raise ValueError(f"unsupported diffusers scheduler option {key}={config[key]!r} (only {off!r} is implemented)")
  if config.get("clip_sample", False):
    raise ValueError("unsupported diffusers scheduler option clip_sample=True (Stable Diffusion's configs set False)")
  beta_schedule = config.get("beta_schedule", "linear")
  if beta_schedule not in _BETA_SCHEDULES:
    raise ValueError(f"unsupported diffusers beta_schedule {beta_schedule!r} (implemented: "
                     f"{', '.join(_BETA_SCHEDULES)})")
  prediction = config.get("prediction_type", "epsilon")
  if prediction not in _PREDICTIONS:
    raise ValueError(f"unsupported diffusers prediction_type {prediction!r} (implemented: {', '.join(_PREDICTIONS)})")
  return dict(schedule=_BETA_SCHEDULES[beta_schedule], num_timesteps=int(config.get("num_train_timesteps", 1000)),
              beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)),
              prediction=_PREDICTIONS[prediction], timestep_spacing=config.get("timestep_spacing", "leading"),
              steps_offset=int(config.get("steps_offset", 0)),
              set_alpha_to_one=bool(config.get("set_alpha_to_one", _ALPHA_TO_ONE_DEFAULTS.get(kind, True))))


def scheduler_from_diffusion(diffusion: Mapping[str, Any]) -> dict[str, Any]:
  """The project's `diffusion` settings as a diffusers DDIMScheduler config (the inverse of
  diffusion_from_scheduler)."""
  schedules = {ours: theirs for theirs, ours in _BETA_SCHEDULES.items()}
  predictions = {ours: theirs for theirs, ours in _PREDICTIONS.items()}
  if diffusion["schedule"] not in schedules:
    raise ValueError(f"diffusion.schedule {diffusion['schedule']!r} has no diffusers beta_schedule")
  return {"_class_name": "DDIMScheduler", "beta_schedule": schedules[diffusion["schedule"]],
          "beta_start": float(diffusion["beta_start"]), "beta_end": float(diffusion["beta_end"]),
          "num_train_timesteps": int(diffusion["num_timesteps"]), "prediction_type": predictions[diffusion["prediction"]],
          "timestep_spacing": diffusion["timestep_spacing"], "steps_offset": int(diffusion["steps_offset"]),
          "set_alpha_to_one": bool(diffusion["set_alpha_to_one"]), "clip_sample": False, "thresholding": False,
          "rescale_betas_zero_snr": False}


def read_scheduler(pipeline: DiffusersPipeline) -> dict[str, Any]:
  """The pipeline's scheduler/scheduler_config.json as `diffusion` settings (diffusion_from_scheduler)."""
  file = os.path.join(pipeline.component("scheduler"), "scheduler_config.json")
  if not os.path.isfile(file):
    raise ValueError(f"the diffusers pipeline in {pipeline.folder} has no scheduler/scheduler_config.json")
  return diffusion_from_scheduler(read_json_object(file))
