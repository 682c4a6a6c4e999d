"""Latent models (vae.enabled): the train step encodes with the frozen VAE, `suti train` runs end to end from a
diffusers vae/ folder, its checkpoint samples at the VAE's resolution, latent DreamBooth experts train, and the latent
toy configs (tiny) evaluate end to end."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared_fixtures import (CONFIGS, TINY_LATENT_OVERRIDES, TINY_MODEL_OVERRIDES, TINY_RUN, tiny_config,
                             write_tiny_checkpoint)
from suti import cli
from suti.config import load_config
from suti.core.safe_image import decode_image
from suti.core.tree_paths import flatten_dict
from suti.diffusion.schedules import make_schedule
from suti.experts.dreambooth import ExpertTrainer
from suti.infer.load_model import load_model
from suti.infer.sampler import Sampler
from suti.models.convert_vae import load_diffusers_vae, save_diffusers_vae
from suti.models.load_weights import load_weights
from suti.models.model import SuTIModel, null_text, vae_config
from suti.models.vae import AutoencoderKL
from suti.toy.web import write_toyweb
from suti.train.optim import make_optimizer
from suti.train.step import create_train_state, make_train_step

pytestmark = pytest.mark.costly(seconds=60)  # cold seconds (--durations): costly files start first

LATENT = TINY_LATENT_OVERRIDES  # the tiny UNet on 8x8x4 latents of a 2-level VAE: 16x16 images, the toy web's size


def _batch(model, n=4, seed=0):
  images = np.random.default_rng(seed).uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)
  ids, mask = model.tokenize(["a red ball on the beach"] * n)
  return {"images": jnp.asarray(images), "ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}


def _step(model, cfg):
  tx, _ = make_optimizer(cfg.train)
  graphdef, state = create_train_state(model, tx, cfg)
  null_ids, null_mask = null_text(model, 1)
  return jax.jit(make_train_step(graphdef, tx, make_schedule(cfg.diffusion), cfg, jnp.asarray(null_ids),
                                 jnp.asarray(null_mask))), state


def test_latent_step_is_the_pixel_step_on_the_vae_latents():
  """One step of a latent model equals the same UNet's step as a pixel model on the VAE's posterior samples
  (drawn from the step's first rng split), and never changes the VAE."""
  cfg = tiny_config(overrides=LATENT)
  pixel_cfg = tiny_config(overrides=[("model.in_channels", "4"), ("model.out_channels", "4")])
  latent_model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  pixel_model = SuTIModel(pixel_cfg, rngs=nnx.Rngs(1))
  weights = {k: v for k, v in flatten_dict(nnx.to_pure_dict(nnx.state(latent_model, nnx.Param))).items()
             if not k.startswith("vae/")}
  load_weights(pixel_model, weights, strict=True)
  batch = _batch(latent_model)
  rng = jax.random.key(3)
  step_rng, vae_rng = jax.random.split(rng)
  latents = latent_model.vae.encode_latents(batch["images"], vae_rng)
  assert latents.shape == (4, 8, 8, 4)

  latent_step, latent_state = _step(latent_model, cfg)
  vae_before = nnx.to_pure_dict(nnx.state(latent_model.vae, nnx.Param))
  assert not any(k.startswith("vae/") for k in flatten_dict(nnx.to_pure_dict(latent_state.params)))  # frozen
  latent_state, latent_metrics = latent_step(latent_state, batch, rng)
  pixel_step, pixel_state = _step(pixel_model, pixel_cfg)
  pixel_state, pixel_metrics = pixel_step(pixel_state, dict(batch, images=latents), step_rng)

  np.testing.assert_allclose(latent_metrics["loss"], pixel_metrics["loss"], rtol=1e-5)
  ours = flatten_dict(nnx.to_pure_dict(latent_state.params))
  reference = flatten_dict(nnx.to_pure_dict(pixel_state.params))
  assert ours.keys() == reference.keys()
  for name in ours:
    np.testing.assert_allclose(ours[name], reference[name], atol=1e-6, err_msg=name)
  vae_after = flatten_dict(nnx.to_pure_dict(latent_state.frozen))
  for name, value in flatten_dict(vae_before).items():
    np.testing.assert_array_equal(vae_after["vae/" + name], value)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
  """A random tiny VAE of LATENT's shape, saved as a diffusers vae/ folder."""
  folder = str(tmp_path_factory.mktemp("vae") / "vae")
  save_diffusers_vae(AutoencoderKL(vae_config(tiny_config(overrides=LATENT)), rngs=nnx.Rngs(5)), folder)
  return folder


def _train_args(workdir, web, *extra, config="toy.py", latent=LATENT):
  overrides = list(TINY_MODEL_OVERRIDES) + list(TINY_RUN) + [
      ("train.steps", "2"), ("train.checkpoint_every", "2"), *latent, ("data.shards", os.path.join(web, "*.tar"))]
  return (["train", "--config", os.path.join(CONFIGS, config), "--workdir", str(workdir), "--no-progress"]
          + [f"--config.{k}={v}" for k, v in overrides] + list(extra))


def test_suti_train_configs_toy_latent_then_sample_it(tiny_base_run, tmp_path):
  """configs/toy_latent.py with the shipped toy VAE (a tiny UNet on 8x8 latents of the 16 px toy web): trains,
  writes latent previews (decoded), keeps the VAE exactly as shipped, and samples at the VAE's output size."""
  web = os.path.join(os.path.dirname(tiny_base_run), "web")
  assert cli.main(_train_args(tmp_path / "run", web, "--config.train.sample_every=2", "--config.train.num_samples=2",
                              config="toy_latent.py", latent=())) == 0
  loaded = load_model(str(tmp_path / "run"))
  assert loaded.image_size == 16 and loaded.cfg.model.image_size == 8
  previews = sorted(glob.glob(str(tmp_path / "run" / "samples" / "*.png")))
  assert previews, os.listdir(tmp_path / "run")
  shipped = load_diffusers_vae(os.path.join(os.path.dirname(CONFIGS), "checkpoints", "toy_vae"))
  for (path, ours), (_, theirs) in zip(nnx.to_flat_state(nnx.state(loaded.model.vae, nnx.Param)),
                                       nnx.to_flat_state(nnx.state(shipped, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(ours.get_value()), np.asarray(theirs.get_value()), err_msg=str(path))
  sampler = Sampler.for_loaded(loaded, batch_size=2, sample_overrides={"steps": 2})
  images = sampler.sample(["a red ball on the beach"] * 2, seed=0)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  np.testing.assert_array_equal(sampler.sample(["a red ball"] * 2, 0, init_noise=noise),
                                sampler.sample(["a red ball"] * 2, 1, init_noise=noise))  # x_T given: seed unused


@pytest.mark.parametrize("case, message", [
    ("no_vae_weights", "a latent model (vae.enabled) needs its VAE's weights: set vae.checkpoint"),
    ("other_vae", "is not the configured one: vae.latent_channels differ (latent_channels=4 there)"),
])
def test_latent_training_errors_are_one_line(case, message, tiny_base_run, vae_folder, tmp_path, capsys):
  web = os.path.join(os.path.dirname(tiny_base_run), "web")
  extra = [] if case == "no_vae_weights" else [f"--config.vae.checkpoint={vae_folder}", "--config.vae.latent_channels=8",
                                               "--config.model.in_channels=8", "--config.model.out_channels=8"]
  assert cli.main(_train_args(tmp_path / "run", web, *extra)) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err


def test_latent_lora_expert_trains_and_leaves_the_vae_alone():
  base_cfg = tiny_config(overrides=LATENT)
  weights = nnx.to_pure_dict(nnx.state(SuTIModel(base_cfg, rngs=nnx.Rngs(0)), nnx.Param))
  ex = load_config(os.path.join(CONFIGS, "pipeline", "toy_icl.py")).experts
  ex.prior_weight, ex.steps, ex.batch_size = 0.0, 3, 2
  ex.lora.down_ranks, ex.lora.mid_rank, ex.lora.up_ranks = (4, 0), 0, (0, 4)
  trainer = ExpertTrainer(base_cfg, weights, ex)
  assert trainer.image_size == 16
  images = [np.random.default_rng(i).integers(0, 255, (20, 20, 3), np.uint8) for i in range(3)]
  expert = trainer.train(images, "ball", "sks", seed=0)
  assert len(expert.losses) == 3 and np.all(np.isfinite(expert.losses))
  assert expert.weights and not any("vae" in name for name in expert.weights)
  merged = trainer.merged_weights(expert)
  flat = flatten_dict(weights)
  assert all(np.array_equal(merged[k], flat[k]) for k in flat if k.startswith("vae/"))
  assert any(not np.array_equal(merged[k], flat[k]) for k in flat if k.startswith("unet/"))


def test_latent_apprentice_and_dreambooth_evaluate_end_to_end(tmp_path):
  """configs/toy_latent_suti.py and configs/toy_latent.py (tiny): `suti eval` runs the apprentice (demos encoded to
  latents), text-only and latent DreamBooth experts, and writes images at the VAE's output size."""
  write_toyweb(str(tmp_path / "web"), 2, seed=0, benchmark_per_class=1)
  app = write_tiny_checkpoint(str(tmp_path / "app"), "toy_latent_suti.py", live_neighbors=True, overrides=LATENT)
  base = write_tiny_checkpoint(str(tmp_path / "base"), "toy_latent.py", overrides=LATENT)
  out = tmp_path / "out"
  assert cli.main(["eval", "--checkpoint", app, "--benchmark", str(tmp_path / "web" / "benchmark"), "--out", str(out),
                   "--no-progress", "--config.eval.max_subjects=1", "--config.eval.max_prompts=2",
                   "--config.eval.images_per_prompt=1", "--config.eval.batch_size=2", "--config.sample.steps=2",
                   f"--config.dreambooth.base_checkpoint={base}", "--config.dreambooth.steps=2",
                   "--config.dreambooth.num_class_images=2", "--config.eval.report_prompts=1"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  assert {"suti", "text_only", "dreambooth"} <= set(metrics["methods"])
  subject = next(iter(metrics["per_subject"]))
  for method in ("suti", "text_only", "dreambooth"):
    image = decode_image((out / "images" / method / subject / "00_0.png").read_bytes())
    assert image.shape == (16, 16, 3), method


def test_latent_apprentice_encodes_demos_to_latents_first():
  """A latent apprentice's neighbor tokens of pixel demos are the UNet's tokens of the demos' VAE latents (the
  posterior mean): demos go through the VAE, then through the UNet's own down path."""
  cfg = tiny_config("toy_latent_suti.py", overrides=LATENT)
  model = SuTIModel(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  demos = jnp.asarray(rng.uniform(-1, 1, (2, 3, 16, 16, 3)).astype(np.float32))
  ids, mask = model.tokenize(["a photo of a ball"] * 6)
  ids, mask = jnp.asarray(ids).reshape(2, 3, -1), jnp.asarray(mask).reshape(2, 3, -1)
  present = jnp.asarray([[True, True, False], [True, True, True]])
  ours = model.encode_neighbors(demos, ids, mask, present)
  latents = model.vae.encode_latents(demos.reshape(6, 16, 16, 3)).reshape(2, 3, 8, 8, 4)
  emb, pooled = model.text(ids.reshape(6, -1), mask.reshape(6, -1))
  reference = model.unet.encode_neighbors(latents, emb.reshape(2, 3, *emb.shape[1:]), mask, present,
                                          pooled_texts=pooled.reshape(2, 3, -1))
  np.testing.assert_allclose(np.asarray(ours.tokens), np.asarray(reference.tokens), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(ours.mask), np.asarray(reference.mask))
