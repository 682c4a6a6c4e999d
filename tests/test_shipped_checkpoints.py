"""The checkpoints the repository ships load strictly and match the configs that document them."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from suti.config import load_config
from suti.infer.load_model import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, config, kind, step", [("toy_base", "toy.py", "base", 6000),
                                                      ("toy_suti", "toy_suti.py", "apprentice", 3000)])
def test_shipped_checkpoint_loads_and_matches_its_config(name, config, kind, step):
  loaded = load_model(os.path.join(REPO, "checkpoints", name), kind=kind)
  assert loaded.kind == kind and loaded.step == step
  documented = load_config(os.path.join(REPO, "configs", config))
  # Model, text encoder and diffusion sections decide what the weights mean, sample how they are used by default;
  # a config edit that changes them would silently stop describing the shipped model.
  for section in ("model", "text", "diffusion", "sample"):
    assert loaded.cfg[section].to_dict() == documented[section].to_dict(), section
  assert documented.train.steps == step
  leaves = jax.tree_util.tree_leaves(nnx.state(loaded.model, nnx.Param))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_shipped_apprentice_guides_with_two_rows_per_step_like_plain_sampling():
  """The few-shot speed claim (as fast as text-to-image) rests on equal text and neighbor scales: joint guidance
  then skips the text-only prediction. Count the rows the guided denoiser asks the model for."""
  import jax.numpy as jnp
  from suti.diffusion.guidance import make_guided_denoiser
  loaded = load_model(os.path.join(REPO, "checkpoints", "toy_suti"), kind="apprentice")
  calls = []

  def fake_model(x, t, text_on, neighbors_on):
    calls.append((np.asarray(text_on), np.asarray(neighbors_on)))
    return jnp.zeros_like(x)

  x, t = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,), jnp.int32)
  make_guided_denoiser(fake_model, loaded.cfg.sample)(x, t, jax.random.key(0))
  make_guided_denoiser(fake_model, loaded.cfg.sample, has_neighbors=False)(x, t, jax.random.key(0))
  (fewshot_text, fewshot_neighbors), (plain_text, _) = calls
  assert len(fewshot_text) == len(plain_text) == 2 * x.shape[0]
  np.testing.assert_array_equal(fewshot_text, [False, False, True, True])
  np.testing.assert_array_equal(fewshot_neighbors, [False, False, True, True])


@pytest.fixture(scope="module")
def shipped_apprentice():
  return load_model(os.path.join(REPO, "checkpoints", "toy_suti"), kind="apprentice")


def test_shipped_apprentice_has_trained_its_zero_initialised_neighbor_projections(shipped_apprentice):
  """The neighbor kernels a fresh apprentice starts at exactly zero (the attention output projections, so step 0
  is the base model) moved in training: a checkpoint exported from an untrained or base-initialised apprentice
  would sample exactly like the base model and ignore every demo. Measured: rms 0.025 - 0.031, max |w| 0.11 -
  0.13 in the three layers; asserted rms > 0.005."""
  from suti.core.tree_paths import path_string
  from suti.models.model import SuTIModel
  from suti.models.neighbors import is_neighbor_param

  def kernels(model):
    return {path_string(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
            if is_neighbor_param(path_string(p).split("/")) and path_string(p).endswith("kernel")}

  fresh = kernels(SuTIModel(shipped_apprentice.cfg, rngs=nnx.Rngs(0)))
  zero_init = sorted(name for name, w in fresh.items() if not w.any())
  # The mid block's neighbor attention and the two of the 4x4 up block.
  assert zero_init == [f"unet/{block}/neighbor_attentions/{i}/attn/to_out/kernel"
                       for block, i in (("mid_block", 0), ("up_blocks/0", 0), ("up_blocks/0", 1))], zero_init
  shipped = kernels(shipped_apprentice.model)
  rms = {name: float(np.sqrt(np.mean(np.square(shipped[name])))) for name in zero_init}
  assert all(r > 0.005 for r in rms.values()), rms


def _centre_colour(images: np.ndarray) -> np.ndarray:
  """Mean RGB (0-255) of the central half of each image [N, S, S, 3] -> [N, 3]: where the toy subject stands
  (centre position, medium size), so the background of the context weighs little."""
  s = images.shape[1]
  centre = np.asarray(images, np.float32)[:, s // 4:s - s // 4, s // 4:s - s // 4]
  return centre.reshape(len(images), -1, 3).mean(axis=1)


def test_shipped_apprentice_takes_the_subject_colour_from_its_demos(shipped_apprentice):
  """Two held-out subjects, a red and a green ball, three demos each (rendered at 32 px in other contexts than the
  prompt's); one prompt, one seed, 10 DDIM steps. Each output's subject colour is nearer its own demos' than the
  other subject's, and swapping the demos between the rows (same noise per row) swaps the colours. Measured
  (distance of the centre colour to own demos / to the other's, RGB 0-255; the two demo colours are 181
  apart): own 11 - 42, other 180 - 209; asserted own < 0.5 * other."""
  from suti.infer.demos import default_caption
  from suti.infer.sampler import Sampler
  from suti.toy import world as tw

  heldout = {s.id for s in tw.subjects_of_split("heldout")}
  red, green = tw.Subject("ball", "red"), tw.Subject("ball", "green")
  assert red.id in heldout and green.id in heldout
  contexts = [tw.Context(background=b, variant=i) for i, b in enumerate(("beach", "sky", "snow"))]
  demos = {s: [tw.render(s, c, 32) for c in contexts] for s in (red, green)}
  demo_colour = {s: _centre_colour(np.stack(d)).mean(axis=0) for s, d in demos.items()}
  assert np.linalg.norm(demo_colour[red] - demo_colour[green]) > 150  # very different bodies

  prompt = tw.prompt_for("ball", tw.Context(background="room"), token="sks")
  captions = [[default_caption(prompt)] * 3] * 2
  sampler = Sampler.for_loaded(shipped_apprentice, batch_size=2, sample_overrides={"steps": 10, "sampler": "ddim"})
  distances = []
  for rows in ((red, green), (green, red)):
    out = sampler.sample([prompt, prompt], seed=0, demos=[demos[s] for s in rows], demo_captions=captions)
    for subject, colour in zip(rows, _centre_colour(out)):
      other = green if subject == red else red
      distances.append((subject.id, float(np.linalg.norm(colour - demo_colour[subject])),
                        float(np.linalg.norm(colour - demo_colour[other]))))
  assert all(own < 0.5 * other for _, own, other in distances), distances


def test_shipped_toy_vae_is_the_one_the_latent_configs_name():
  """checkpoints/toy_vae loads as a diffusers vae/ folder whose config is exactly the vae section of the latent
  toy configs (the trainer refuses a vae.checkpoint that differs), and reconstructs a toy render."""
  from suti.models.convert_vae import load_diffusers_vae
  from suti.models.model import vae_config
  from suti.toy import world
  from suti.core.image_ops import to_model_range
  vae = load_diffusers_vae(os.path.join(REPO, "checkpoints", "toy_vae"))
  for config in ("toy_latent.py", "toy_latent_suti.py"):
    cfg = load_config(os.path.join(REPO, "configs", config))
    assert vae_config(cfg) == vae.config, config
    assert cfg.vae.checkpoint == "checkpoints/toy_vae"
  image = to_model_range(world.render(world.subjects_of_split("heldout")[0], world.Context(background="grass"), 32))
  recon = np.asarray(vae.decode(vae.encode(image[None])[0]))[0]
  assert 10 * np.log10(4.0 / np.mean((recon - image) ** 2)) > 24  # dB; 30.5 on average over held-out renders
