"""`suti train --config configs/toy_vae.py`: deterministic toy batches, exact resume, the diffusers vae/ folder and
report it leaves, and the PSNR it reports."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from shared_fixtures import CONFIGS
from suti import cli
from suti.checkpoint.store import Checkpointer
from suti.config import load_config
from suti.core.paths import resolve_path
from suti.core.safe_image import decode_image
from suti.embed.clip import ClipEmbedder
from suti.models.convert_vae import load_diffusers_vae
from suti.train import vae_trainer

pytestmark = pytest.mark.costly(seconds=30)  # cold seconds (--durations): costly files start first

TINY = ("--config.vae.block_out_channels=(8, 16)", "--config.vae.norm_num_groups=4", "--config.vae.sample_size=16",
        "--config.data.image_size=16", "--config.train.batch_size=4", "--config.train.steps=4",
        "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.train.warmup_steps=1",
        "--config.eval.images=8", "--config.eval.identity_candidates=3")


def _train(workdir, *extra):
  return cli.main(["train", "--config", os.path.join(CONFIGS, "toy_vae.py"), "--workdir", str(workdir),
                   "--no-progress", *TINY, *extra])


def _params(workdir):
  cfg = load_config(os.path.join(CONFIGS, "toy_vae.py"), [a[len("--config."):] for a in TINY])
  abstract = vae_trainer.initial_state(cfg)[3]
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    step, state, _ = checkpointer.restore(abstract)
  finally:
    checkpointer.close()
  return step, {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state.params)}


def test_toy_renders_are_deterministic_and_split():
  a = vae_trainer.toy_renders(0, 5, 3, 16)
  assert a.shape == (3, 16, 16, 3) and a.dtype == np.float32 and -1 <= a.min() and a.max() <= 1
  np.testing.assert_array_equal(a, vae_trainer.toy_renders(0, 5, 3, 16))
  assert not np.array_equal(a, vae_trainer.toy_renders(0, 6, 3, 16))
  assert not np.array_equal(a, vae_trainer.toy_renders(0, 5, 3, 16, split="heldout"))


def test_psnr_closed_form():
  a = np.zeros((2, 4, 4, 3), np.float32)
  b = a + np.array([0.2, 0.02], np.float32)[:, None, None, None]
  np.testing.assert_allclose(vae_trainer.psnr(a, b), [20.0, 40.0], rtol=1e-6)  # 10 log10(2^2 / 0.2^2)


def test_train_vae_resumes_exactly_and_ships_a_diffusers_folder(tmp_path, capsys):
  assert _train(tmp_path / "straight") == 0
  assert "VAE done, held-out PSNR" in capsys.readouterr().out
  assert _train(tmp_path / "resumed", "--max-steps", "2") == 0
  assert not os.path.exists(tmp_path / "resumed" / "vae")  # stopped early: nothing shipped yet
  assert _train(tmp_path / "resumed") == 0
  step_a, straight = _params(tmp_path / "straight")
  step_b, resumed = _params(tmp_path / "resumed")
  assert step_a == step_b == 4 and straight.keys() == resumed.keys()
  for name in straight:
    np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)

  report = json.loads((tmp_path / "straight" / "report.json").read_text())
  assert report["steps"] == 4 and report["heldout_images"] == 8 and report["latent_shape"] == [8, 8, 4]
  assert 0 <= report["identity_top1_after_encode_decode"] <= 1 and report["identity_candidates"] == 3
  vae = load_diffusers_vae(str(tmp_path / "straight" / "vae"))
  np.testing.assert_allclose(vae.config.scaling_factor, 1.0 / report["latent_std"], rtol=1e-6)
  np.testing.assert_allclose(vae.config.shift_factor, report["latent_mean"], rtol=1e-6)
  shipped = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
  assert shipped.keys() == straight.keys()
  for name in straight:
    np.testing.assert_array_equal(shipped[name], straight[name], err_msg=name)
  # The report's PSNR is that of the shipped VAE on the same held-out renders.
  cfg = load_config(os.path.join(CONFIGS, "toy_vae.py"), [a[len("--config."):] for a in TINY])
  again = vae_trainer.evaluate(vae, cfg, str(tmp_path / "again"))
  np.testing.assert_allclose(again["heldout_psnr_db"], report["heldout_psnr_db"], rtol=1e-5)
  sheet = decode_image((tmp_path / "straight" / "reconstructions.png").read_bytes())
  assert sheet.shape[1] > 16 * 16  # 8 renders | 8 reconstructions, enlarged
  lines = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]  # one line per step, none repeated by the restart


def test_identity_fidelity_of_unchanged_renders_is_that_of_the_renders():
  cfg = load_config(os.path.join(CONFIGS, "toy_vae.py"))
  clip = ClipEmbedder(cfg.eval.clip_model, resolve_path(cfg.eval.clip_checkpoint))
  images, subjects = vae_trainer.toy_renders_of(0, 0, 6, 32, split="heldout")
  same = vae_trainer.identity_fidelity(clip, images, images.copy(), subjects, 10)
  assert same["identity_top1_true_renders"] == same["identity_top1_after_encode_decode"]
  assert same["identity_top1_true_renders"] > 0.5  # the toy CLIP tells the subjects apart
  np.testing.assert_allclose(same["clip_cosine_render_vs_reconstruction"], 1.0, rtol=1e-5)
  flat = vae_trainer.identity_fidelity(clip, images, np.full_like(images, 128), subjects, 10)
  assert flat["clip_cosine_render_vs_reconstruction"] < 0.9  # gray squares: another picture
