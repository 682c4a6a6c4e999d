"""Reading a diffusers pipeline folder: its components, the kinds the project takes, and its scheduler config as
the project's diffusion settings (the same noise schedule as diffusers' scheduler)."""
import json

import numpy as np
import pytest

import suti  # noqa: F401  (installs the torchvision shim before diffusers is imported)
from suti.checkpoint.diffusers_pipeline import diffusion_from_scheduler, read_pipeline, read_scheduler
from suti.diffusion.schedules import make_schedule
from shared_fixtures import LazyImport

pytestmark = pytest.mark.costly(seconds=8)  # cold seconds (--durations): costly files start first

diffusers = LazyImport("diffusers")

SD15_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
              "safety_checker": [None, None], "feature_extractor": [None, None]}


def _pipeline_folder(root, index=SD15_INDEX, folders=("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
  root.mkdir(exist_ok=True)
  (root / "model_index.json").write_text(json.dumps(index))
  for name in folders:
    (root / name).mkdir(exist_ok=True)
  return root


@pytest.mark.parametrize("kind,options", [
    ("PNDMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                           skip_prk_steps=True)),  # SD 1.5's own scheduler/ (PNDM: set_alpha_to_one False)
    ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                           set_alpha_to_one=False, clip_sample=False)),
    ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                           timestep_spacing="trailing", clip_sample=False)),
    ("DDPMScheduler", dict(beta_schedule="linear", clip_sample=False)),
])
def test_scheduler_config_gives_diffusers_noise_schedule(kind, options):
  scheduler = getattr(diffusers, kind)(**options)
  settings = diffusion_from_scheduler(dict(scheduler.config, _class_name=kind))
  schedule = make_schedule(settings)
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), scheduler.alphas_cumprod.numpy(), rtol=2e-5,
                             atol=1e-7)
  assert schedule.steps_offset == scheduler.config.get("steps_offset", 0)
  assert schedule.timestep_spacing == scheduler.config.get("timestep_spacing", "leading")
  want_one = scheduler.config.get("set_alpha_to_one", True) if kind != "DDPMScheduler" else True
  assert schedule.set_alpha_to_one == want_one
  assert settings["prediction"] == {"epsilon": "eps", "v_prediction": "v"}[scheduler.config.prediction_type]


@pytest.mark.parametrize("change,message", [
    (dict(clip_sample=True), "clip_sample=True"),
    (dict(beta_schedule="sigmoid"), "unsupported diffusers beta_schedule 'sigmoid'"),
    (dict(prediction_type="sample"), "unsupported diffusers prediction_type 'sample'"),
    (dict(thresholding=True), "unsupported diffusers scheduler option thresholding=True"),
    (dict(trained_betas=[0.1, 0.2]), "unsupported diffusers scheduler option trained_betas"),
])
def test_scheduler_options_the_project_cannot_follow_are_named(change, message):
  with pytest.raises(ValueError, match=message):
    diffusion_from_scheduler({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", **change})


def test_reads_the_components_and_the_scheduler(tmp_path):
  folder = _pipeline_folder(tmp_path / "sd")
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(
      _class_name="PNDMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)))
  pipeline = read_pipeline(str(folder))
  assert pipeline.classes == {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                              "tokenizer": "CLIPTokenizer", "scheduler": "PNDMScheduler"}
  settings = read_scheduler(pipeline)
  assert (settings["schedule"], settings["steps_offset"], settings["set_alpha_to_one"]) == ("scaled_linear", 1, False)


def test_folder_errors_say_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="is not a diffusers pipeline: it has no model_index.json"):
    read_pipeline(str(tmp_path))
  missing = {k: v for k, v in SD15_INDEX.items() if k != "vae"}
  with pytest.raises(ValueError, match="has no vae component"):
    read_pipeline(str(_pipeline_folder(tmp_path / "a", missing)))
  t5 = dict(SD15_INDEX, text_encoder=["transformers", "T5EncoderModel"])
  with pytest.raises(ValueError, match="text_encoder of kind 'T5EncoderModel', which the project cannot take"):
    read_pipeline(str(_pipeline_folder(tmp_path / "b", t5)))
  with pytest.raises(ValueError, match="lists a unet but has no unet/ folder"):
    read_pipeline(str(_pipeline_folder(tmp_path / "c", folders=("vae", "text_encoder", "tokenizer", "scheduler"))))
  with pytest.raises(ValueError, match="has no scheduler/scheduler_config.json"):
    read_scheduler(read_pipeline(str(_pipeline_folder(tmp_path / "d"))))
