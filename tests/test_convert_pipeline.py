"""`suti convert diffusers` and text-to-image `suti generate` on the converted checkpoint, against diffusers' own
StableDiffusionPipeline on the same tiny random pipeline (built and saved here; nothing is downloaded)."""
import json
import os
import shutil
import string

import ml_collections as mlc
import numpy as np
import pytest
from flax import nnx

from shared_fixtures import CONFIGS, LazyImport, write_tiny_checkpoint
from suti import cli
from suti.checkpoint.convert import with_init_text, with_pretrained
from suti.checkpoint.store import checkpoint_config, load_params
from suti.config import load_config
from suti.experts.dreambooth import ExpertTrainer
from suti.core.safe_image import decode_image
from suti.infer.load_model import load_model
from suti.models.load_weights import load_weights
from suti.models.model import SuTIModel

pytestmark = pytest.mark.costly(seconds=60)  # cold seconds (--durations): costly files start first

torch = LazyImport("torch")
diffusers = LazyImport("diffusers")
transformers = LazyImport("transformers")

PROMPT = "a photo of the dog on the beach"
LATENT, CHANNELS = 8, 4  # the UNet's sample; the VAE's two levels make 16x16 images


def _clip_tokenizer(folder):
  """A real CLIPTokenizer (byte-pair merges, SD's special tokens, <|endoftext|> as padding) over a tiny vocab."""
  vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
  vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
  merges = ["t h", "th e</w>", "o n</w>", "d o", "do g</w>"]
  for merged in ("th", "the</w>", "on</w>", "do", "dog</w>", "<|startoftext|>", "<|endoftext|>"):
    vocab[merged] = len(vocab)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                    model_max_length=77)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """A tiny StableDiffusionPipeline with SD 1.5's scheduler config, saved as a diffusers folder."""
  root = tmp_path_factory.mktemp("sd")
  torch.manual_seed(0)
  tokenizer = _clip_tokenizer(str(root / "vocab"))
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id))
  unet = diffusers.UNet2DConditionModel(
      sample_size=LATENT, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=(32, 64),
      layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
      norm_num_groups=32)
  vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=CHANNELS,
                                norm_num_groups=32, sample_size=2 * LATENT,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      timestep_spacing="leading")
  pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
  pipe.save_pretrained(str(root / "pipeline"))
  return str(root / "pipeline")


def _diffusers_image(folder, latents_nhwc, steps, scale):
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    out = pipe(PROMPT, latents=torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2).copy()),
               num_inference_steps=steps, guidance_scale=scale, output_type="np").images
  return np.round(out * 255).astype(np.uint8)


def test_converted_pipeline_generates_diffusers_image(pipeline_dir, tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  assert cli.main(["convert", "diffusers", "--src", pipeline_dir, "--out", str(ckpt)]) == 0
  assert "suti convert:" in capsys.readouterr().out
  noise = np.random.default_rng(0).standard_normal((1, LATENT, LATENT, CHANNELS)).astype(np.float32)
  np.save(tmp_path / "x_T.npy", noise)
  out = tmp_path / "dog.png"
  assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--out", str(out), "--sampler",
                   "ddim", "--steps", "10", "--text-scale", "7.5", "--init-noise", str(tmp_path / "x_T.npy"),
                   "--no-progress"]) == 0
  assert "text-to-image" in capsys.readouterr().out
  ours = decode_image(out.read_bytes())
  theirs = _diffusers_image(pipeline_dir, noise, 10, 7.5)[0]
  assert ours.shape == theirs.shape == (2 * LATENT, 2 * LATENT, 3)
  assert 0.25 < np.mean((theirs > 0) & (theirs < 255)), "random weights that saturate every pixel test nothing"
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert diff.mean() <= 1.0, f"mean |ours - diffusers| = {diff.mean():.3f} / 255 (max {diff.max()})"
  # The same x_T with another prompt gives another image: the text really goes through CLIP and the UNet.
  assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", "a cat", "--out", str(tmp_path / "cat.png"),
                   "--sampler", "ddim", "--steps", "10", "--init-noise", str(tmp_path / "x_T.npy"),
                   "--no-progress"]) == 0
  assert np.abs(decode_image((tmp_path / "cat.png").read_bytes()).astype(int) - ours).mean() > 2


def test_converted_checkpoint_carries_config_and_tokenizer(pipeline_dir, tmp_path):
  ckpt = tmp_path / "ckpt"
  assert cli.main(["convert", "diffusers", "--src", pipeline_dir, "--out", str(ckpt)]) == 0
  moved = tmp_path / "elsewhere"
  shutil.move(str(ckpt), str(moved))  # the tokenizer travels with the checkpoint
  loaded = load_model(str(moved))
  cfg = loaded.cfg
  assert loaded.kind == "base" and loaded.image_size == 2 * LATENT
  assert cfg.text.tokenizer == str(moved / "tokenizer") and cfg.text.mask_padding is False
  assert (cfg.diffusion.schedule, cfg.diffusion.timestep_spacing, cfg.diffusion.steps_offset,
          cfg.diffusion.set_alpha_to_one, cfg.diffusion.prediction) == ("scaled_linear", "leading", 1, False, "eps")
  assert cfg.vae.enabled and tuple(cfg.vae.block_out_channels) == (32, 64) and cfg.model.image_size == LATENT
  ids, mask = loaded.model.tokenize([PROMPT])
  reference = transformers.AutoTokenizer.from_pretrained(os.path.join(pipeline_dir, "tokenizer"))
  np.testing.assert_array_equal(ids[0], reference(PROMPT, padding="max_length", max_length=77)["input_ids"])
  assert mask.all()  # Stable Diffusion: CLIP and the UNet see all 77 positions
  # Every converted weight equals diffusers' (the UNet's conv_in, the VAE decoder's conv_out, CLIP's tokens).
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
  m = loaded.model
  np.testing.assert_array_equal(np.asarray(m.unet.conv_in.kernel[...]),
                                pipe.unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(m.vae.decoder.conv_out.bias[...]),
                                pipe.vae.decoder.conv_out.bias.detach().numpy())
  np.testing.assert_array_equal(np.asarray(m.text.model.token_embedding.embedding[...]),
                                pipe.text_encoder.get_input_embeddings().weight.detach().numpy())
  # `suti export` of it carries the tokenizer along too.
  assert cli.main(["export", "--checkpoint", str(moved), "--out", str(tmp_path / "exported")]) == 0
  assert os.path.isfile(tmp_path / "exported" / "tokenizer" / "tokenizer_config.json")
  assert load_model(str(tmp_path / "exported")).cfg.text.tokenizer == str(tmp_path / "exported" / "tokenizer")


@pytest.mark.parametrize("case, message", [
    ("not_pipeline", "is not a diffusers pipeline: it has no model_index.json"),
    ("no_vae", "has no vae component"),
    ("wrong_kind", "has a scheduler of kind 'FlowMatchEulerDiscreteScheduler', which the project cannot take"),
    ("exists", "already holds a checkpoint (pass --overwrite to replace it)"),
])
def test_convert_errors_are_one_line(case, message, pipeline_dir, tmp_path, capsys):
  src, out = tmp_path / "copy", tmp_path / "out"
  shutil.copytree(pipeline_dir, src)
  index = json.loads((src / "model_index.json").read_text())
  if case == "not_pipeline":
    (src / "model_index.json").unlink()
  elif case == "no_vae":
    index.pop("vae")
  elif case == "wrong_kind":
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
  elif case == "exists":
    (out / "0").mkdir(parents=True)
  if (src / "model_index.json").exists():
    (src / "model_index.json").write_text(json.dumps(index))
  assert cli.main(["convert", "diffusers", "--src", str(src), "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err


def test_init_noise_of_the_wrong_shape_is_one_line(pipeline_dir, tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  assert cli.main(["convert", "diffusers", "--src", pipeline_dir, "--out", str(ckpt)]) == 0
  np.save(tmp_path / "pixels.npy", np.zeros((1, 2 * LATENT, 2 * LATENT, 3), np.float32))  # pixels, not latents
  assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--out", str(tmp_path / "o.png"),
                   "--init-noise", str(tmp_path / "pixels.npy"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "this model starts from (1, 8, 8, 4)" in err, err
  assert not (tmp_path / "o.png").exists()


def test_converted_checkpoint_is_an_experts_base(pipeline_dir, tmp_path):
  """The experts' base_checkpoint reads a converted checkpoint: a LoRA expert fine-tunes its UNet on 16 px images
  (its VAE's output size), the CLIP and VAE frozen."""
  ckpt = str(tmp_path / "ckpt")
  assert cli.main(["convert", "diffusers", "--src", pipeline_dir, "--out", ckpt]) == 0
  weights, meta = load_params(ckpt)
  ex = load_config(os.path.join(CONFIGS, "pipeline", "toy_icl.py")).experts
  ex.prior_weight, ex.steps, ex.batch_size, ex.method = 0.0, 2, 2, "lora"
  ex.lora.down_ranks, ex.lora.mid_rank, ex.lora.up_ranks = (4, 0), 0, (0, 4)
  trainer = ExpertTrainer(checkpoint_config(meta), weights, ex)
  assert trainer.image_size == 2 * LATENT
  expert = trainer.train([np.random.default_rng(i).integers(0, 255, (16, 16, 3), np.uint8) for i in range(2)],
                         "dog", "sks")
  assert np.all(np.isfinite(expert.losses)) and expert.weights
  assert all(name.startswith("unet/") for name in expert.weights)


def test_export_diffusers_round_trips_the_pipeline(pipeline_dir, tmp_path):
  """convert, then `suti export --format diffusers`: diffusers loads the folder with from_pretrained, every weight
  equals the original pipeline's, and its own pipeline samples the original's image."""
  ckpt, exported = str(tmp_path / "ckpt"), str(tmp_path / "exported")
  assert cli.main(["convert", "diffusers", "--src", pipeline_dir, "--out", ckpt]) == 0
  assert cli.main(["export", "--format", "diffusers", "--checkpoint", ckpt, "--out", exported]) == 0
  original = diffusers.StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
  again = diffusers.StableDiffusionPipeline.from_pretrained(exported, safety_checker=None, local_files_only=True)
  assert type(again.scheduler).__name__ == "DDIMScheduler"
  for name in ("unet", "vae", "text_encoder"):
    ours, theirs = getattr(again, name).state_dict(), getattr(original, name).state_dict()
    assert ours.keys() == theirs.keys(), name
    for key in theirs:
      assert torch.equal(ours[key], theirs[key]), f"{name} {key}"
  for key in ("beta_schedule", "beta_start", "beta_end", "prediction_type", "timestep_spacing", "steps_offset",
              "set_alpha_to_one", "num_train_timesteps"):
    assert again.scheduler.config[key] == original.scheduler.config[key], key
  noise = np.random.default_rng(1).standard_normal((1, LATENT, LATENT, CHANNELS)).astype(np.float32)
  np.testing.assert_array_equal(_diffusers_image(exported, noise, 5, 7.5), _diffusers_image(pipeline_dir, noise, 5, 7.5))


def test_export_diffusers_needs_a_latent_clip_model(tmp_path, capsys):
  base = write_tiny_checkpoint(str(tmp_path / "base"), "toy.py")
  assert cli.main(["export", "--format", "diffusers", "--checkpoint", base, "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "this checkpoint has no VAE (vae.enabled is off)" in err, err


def test_model_pretrained_trains_from_a_diffusers_folder(pipeline_dir, tiny_base_run, tmp_path, capsys):
  """--config.model.pretrained=DIR: the folder is converted once into <workdir>/pretrained and the run is the
  pipeline's model (whatever shape the config file had), initialised from it; an apprentice on top keeps its
  neighbor settings and starts as the pipeline's UNet plus fresh neighbor layers."""
  web = os.path.join(os.path.dirname(tiny_base_run), "web", "*.tar")
  workdir = tmp_path / "run"
  args = ["train", "--config", os.path.join(CONFIGS, "toy.py"), "--workdir", str(workdir), "--no-progress",
          f"--config.model.pretrained={pipeline_dir}", f"--config.data.shards={web}", "--config.train.steps=1",
          "--config.train.checkpoint_every=1", "--config.train.batch_size=8", "--config.train.sample_every=0",
          "--config.data.shuffle_buffer=16"]
  assert cli.main(args) == 0
  assert os.path.isfile(workdir / "pretrained" / "DONE")
  stamp = os.path.getmtime(workdir / "pretrained" / "DONE")
  assert cli.main(args) == 0  # the same command again: the run is done, the folder not converted again
  assert os.path.getmtime(workdir / "pretrained" / "DONE") == stamp
  trained = load_model(str(workdir))
  assert trained.step == 1 and trained.cfg.model.image_size == LATENT and trained.cfg.text.kind == "clip"
  assert trained.cfg.model.pretrained == pipeline_dir
  converted = load_model(str(workdir / "pretrained"))  # what train.init_from named
  np.testing.assert_array_equal(np.asarray(trained.model.vae.encoder.conv_in.kernel[...]),
                                np.asarray(converted.model.vae.encoder.conv_in.kernel[...]))  # frozen
  np.testing.assert_array_equal(np.asarray(trained.model.text.model.token_embedding.embedding[...]),
                                np.asarray(converted.model.text.model.token_embedding.embedding[...]))  # frozen
  assert not np.array_equal(np.asarray(trained.model.unet.conv_in.kernel[...]),
                            np.asarray(converted.model.unet.conv_in.kernel[...]))  # trained

  # configs/sd15.py as it ships names no CLIP folder: `--config.train.init_from` a converted checkpoint brings it.
  plain = checkpoint_config(load_params(str(workdir / "pretrained"))[1]).to_dict()
  plain["text"] = {k: v for k, v in plain["text"].items() if k not in ("clip_config", "tokenizer")}
  plain["train"]["init_from"] = str(workdir / "pretrained")
  with_text = with_init_text(mlc.ConfigDict(plain))
  assert with_text.text.tokenizer == str(workdir / "pretrained" / "tokenizer") and with_text.text.clip_config
  assert with_text.text.trainable is False
  model = nnx.eval_shape(lambda: SuTIModel(with_text, rngs=nnx.Rngs(0)))
  assert load_weights(model, load_params(with_text.train.init_from)[0], strict=True) > 0

  apprentice_cfg = with_pretrained(load_config(os.path.join(CONFIGS, "toy_suti.py"),
                                               [("model.pretrained", pipeline_dir)]), str(workdir))
  assert apprentice_cfg.model.num_neighbors == 3 and apprentice_cfg.train.init_from == str(workdir / "pretrained")
  apprentice = nnx.eval_shape(lambda: SuTIModel(apprentice_cfg, rngs=nnx.Rngs(0)))
  weights, _ = load_params(apprentice_cfg.train.init_from)
  assert load_weights(apprentice, weights) > 0  # every base weight has its place; only neighbor layers are new
  with pytest.raises(ValueError, match="model.pretrained and train.init_from both name starting weights"):
    with_pretrained(load_config(os.path.join(CONFIGS, "toy.py"), [("model.pretrained", pipeline_dir),
                                                                  ("train.init_from", "/x")]), str(workdir))
