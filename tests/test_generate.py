"""`suti generate` and the few-shot sampler: outputs, sheets, determinism, the demos' effect, one-line errors."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shared_fixtures import write_tiny_checkpoint
from suti import cli
from suti.infer import demos as demos_lib
from suti.viz.contact_sheet import contact_sheet

pytestmark = pytest.mark.costly(seconds=120)  # cold seconds (--durations): costly files start first

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  return {"apprentice": write_tiny_checkpoint(str(root / "apprentice"), live_neighbors=True),
          "base": write_tiny_checkpoint(str(root / "base"), "toy.py")}


def _write(path, array, fmt="PNG"):
  Image.fromarray(array).save(path, format=fmt)
  return str(path)


@pytest.fixture()
def demo_files(tmp_path):
  """Three demos in different sizes and formats: a JPEG 40x30, an RGBA PNG, a 32x32 PNG."""
  rng = np.random.default_rng(0)
  rgba = np.concatenate([rng.integers(0, 255, (20, 24, 3), np.uint8), np.full((20, 24, 1), 128, np.uint8)], -1)
  return [_write(tmp_path / "a.jpg", rng.integers(0, 255, (30, 40, 3), np.uint8), "JPEG"),
          _write(tmp_path / "b.png", rgba),
          _write(tmp_path / "c.png", rng.integers(0, 255, (32, 32, 3), np.uint8))]


def _generate(checkpoint, demos, out, *extra):
  args = ["generate", "--checkpoint", checkpoint, "--prompt", "a sks ball on the beach", "--out", str(out),
          "--steps", "3", "--no-progress", *extra]
  for d in demos:
    args += ["--demo", d]
  return cli.main(args)


def test_generate_writes_images_and_sheet_deterministically(checkpoints, demo_files, tmp_path, capsys):
  assert _generate(checkpoints["apprentice"], demo_files, tmp_path / "x.png", "--num-images", "2", "--seed", "3") == 0
  outs = [np.asarray(Image.open(tmp_path / f"x_{i}.png")) for i in range(2)]
  assert all(o.shape == (8, 8, 3) and o.dtype == np.uint8 for o in outs)
  assert not np.array_equal(outs[0], outs[1])  # two samples, two noises
  sheet = np.asarray(Image.open(tmp_path / "x_sheet.png"))
  expected = contact_sheet([[[np.zeros((8, 8, 3), np.uint8)] * 3, outs]], captions=["p"], scale=8)
  assert sheet.shape == expected.shape  # demos | 2 outputs, tiles of 64 px
  assert "2 image(s) 8x8 from 3 demos" in capsys.readouterr().out
  # Same seed, same bytes; the single-image form writes exactly the --out path.
  assert _generate(checkpoints["apprentice"], demo_files, tmp_path / "y.png", "--num-images", "2", "--seed", "3") == 0
  for i in range(2):
    assert (tmp_path / f"y_{i}.png").read_bytes() == (tmp_path / f"x_{i}.png").read_bytes()
  assert _generate(checkpoints["apprentice"], demo_files, tmp_path / "z.png", "--seed", "3") == 0
  assert os.path.isfile(tmp_path / "z.png") and not os.path.exists(tmp_path / "z_0.png")


def test_the_demos_change_the_output(checkpoints, demo_files, tmp_path):
  """Same prompt and seed, other demos -> another image (the neighbor path is live); fewer demos work too."""
  assert _generate(checkpoints["apprentice"], demo_files, tmp_path / "a.png") == 0
  assert _generate(checkpoints["apprentice"], demo_files[::-1], tmp_path / "b.png") == 0
  assert _generate(checkpoints["apprentice"], demo_files[:1], tmp_path / "c.png") == 0
  a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
  assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_fewshot_sampler_matches_sampling_generate(checkpoints):
  """Sampler (chunked, padded rows) gives what suti.infer.sampling.generate gives for the same inputs."""
  import jax
  from suti.diffusion.schedules import make_schedule
  from suti.core.image_ops import to_uint8
  from suti.diffusion.sample_settings import sample_settings
  from suti.infer.sampler import Sampler
  from suti.infer.load_model import load_model
  from suti.infer.sampling import generate
  loaded = load_model(checkpoints["apprentice"], kind="apprentice")
  rng = np.random.default_rng(1)
  demos = [rng.integers(0, 255, (16, 16, 3), np.uint8) for _ in range(2)]
  prompts = ["a sks ball", "a sks box in the snow"]
  sampler = Sampler.for_loaded(loaded, batch_size=3, sample_overrides={"steps": 4})
  got = sampler.sample(prompts, 5, demos=[demos] * 2, demo_captions=[["a photo of a ball"] * 2] * 2)
  batch = demos_lib.demo_batch([demos] * 3, [["a photo of a ball"] * 2] * 3, image_size=8, max_neighbors=3,
                               tokenize=loaded.model.tokenize)
  ref = generate(loaded.model, make_schedule(loaded.cfg.diffusion), prompts + prompts[-1:],
                 jax.random.fold_in(jax.random.key(5), 0), demos=batch,
                 sample_cfg=sample_settings(loaded.cfg.sample, {"steps": 4}), prediction=loaded.cfg.diffusion.prediction)
  np.testing.assert_array_equal(got, to_uint8(ref)[:2])


def test_default_demo_caption_names_the_class():
  assert demos_lib.default_caption("a sks ball on the beach") == "a photo of a ball"
  assert demos_lib.default_caption("a photo of a dog", token="sks") == ""
  assert demos_lib.default_caption("a zzq teapot", token="zzq") == "a photo of a teapot"


def test_demo_batch_pads_and_masks():
  tok = lambda texts: (np.array([[len(t)] for t in texts]), np.ones((len(texts), 1), bool))
  big = np.full((40, 20, 3), 255, np.uint8)
  batch = demos_lib.demo_batch([[big], [big, big]], [["x"], ["yy", "z"]], image_size=4, max_neighbors=3,
                               tokenize=tok)
  assert batch["images"].shape == (2, 3, 4, 4, 3)
  np.testing.assert_array_equal(batch["neighbor_mask"], [[1, 0, 0], [1, 1, 0]])
  np.testing.assert_array_equal(batch["images"][0, 0], 1.0)  # white, in [-1, 1]
  np.testing.assert_array_equal(batch["images"][0, 1:], 0.0)  # padding: zero images
  np.testing.assert_array_equal(batch["ids"][:, :, 0], [[1, 0, 0], [2, 1, 0]])


@pytest.mark.parametrize("case, message", [
    ("missing", "demo image {tmp}/nope.png does not exist"),
    ("folder", "is a folder, not an image file"),
    ("not_image", "is not a readable image (undecodable_image)"),
    ("truncated", "is not a readable image (truncated_image)"),
    ("no_demos", "needs at least one demo image"),
    ("too_many", "got 4 demo images; this model takes at most 3"),
    ("base", "is a base text-to-image model"),
    ("bad_out", "--out must be a .png path"),
    ("captions", "3 demos but 1 --demo-caption values"),
])
def test_bad_input_is_one_line_and_exit_2(case, message, checkpoints, demo_files, tmp_path, capsys):
  checkpoint, demos, extra, out = checkpoints["apprentice"], demo_files, [], tmp_path / "o.png"
  if case == "missing":
    demos = [str(tmp_path / "nope.png")]
  elif case == "folder":
    demos = [str(tmp_path)]
  elif case == "not_image":
    (tmp_path / "t.png").write_text("hello")
    demos = [str(tmp_path / "t.png")]
  elif case == "truncated":
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:-30])
    demos = [str(tmp_path / "cut.png")]
  elif case == "no_demos":
    demos = []
  elif case == "too_many":
    demos = demo_files + demo_files[:1]
  elif case == "base":
    checkpoint = checkpoints["base"]
  elif case == "bad_out":
    out = tmp_path / "o.jpg"
  elif case == "captions":
    extra = ["--demo-caption", "a ball"]
  assert _generate(checkpoint, demos, out, *extra) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
  assert not os.path.exists(out)


def test_generate_runs_as_a_console_script(checkpoints, demo_files, tmp_path):
  result = subprocess.run([sys.executable, "-m", "suti.infer.generate", "--checkpoint", checkpoints["apprentice"],
                           "--demo", demo_files[0], "--prompt", "a sks ball", "--out", str(tmp_path / "m.png"),
                           "--steps", "2", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert np.asarray(Image.open(tmp_path / "m.png")).shape == (8, 8, 3)


def test_sampler_and_guidance_flags_change_the_output(checkpoints, demo_files, tmp_path, capsys):
  """Same demos, prompt and seed as the default run: each flag reaches the sampler (the summary line says so) and
  changes the image. The checkpoint's own settings: ddim, text scale 2.25, neighbor scale 2.25."""
  assert _generate(checkpoints["apprentice"], demo_files, tmp_path / "default.png", "--seed", "1") == 0
  assert "ddim 3 steps, text scale 2.25, neighbor scale 2.25, seed 1" in capsys.readouterr().out
  default = np.asarray(Image.open(tmp_path / "default.png"))
  for flag, value, shown in (("--sampler", "ddpm", "ddpm 3 steps, text scale 2.25, neighbor scale 2.25"),
                             ("--text-scale", "6", "ddim 3 steps, text scale 6.0, neighbor scale 2.25"),
                             ("--neighbor-scale", "0", "ddim 3 steps, text scale 2.25, neighbor scale 0.0")):
    out = tmp_path / f"{flag.strip('-')}.png"
    assert _generate(checkpoints["apprentice"], demo_files, out, "--seed", "1", flag, value) == 0, flag
    assert shown in capsys.readouterr().out, flag
    flagged = np.asarray(Image.open(out))
    assert flagged.shape == default.shape == (8, 8, 3)
    assert not np.array_equal(default, flagged), flag


def test_unknown_sampler_is_one_line_and_exit_2(checkpoints, demo_files, tmp_path, capsys):
  try:
    status = _generate(checkpoints["apprentice"], demo_files, tmp_path / "o.png", "--sampler", "foo")
  except SystemExit as e:  # argparse's own exit, if the command lets it through
    status = e.code
  err = capsys.readouterr().err
  assert status == 2
  assert err.count("\n") == 1 and "foo" in err and "--sampler" in err, err
  assert not os.path.exists(tmp_path / "o.png")
