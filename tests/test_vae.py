"""Our AutoencoderKL against diffusers' PyTorch AutoencoderKL on the same random weights, the folder loader, the
latent scaling and the config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import suti.core.torch_compat  # noqa: F401  (before diffusers: see suti/core/torch_compat.py)
from suti.models.convert_vae import (convert_diffusers_vae, diffusers_vae_config, load_diffusers_vae,
                                     save_diffusers_vae, vae_config_from_diffusers)
from suti.models.vae import AutoencoderKL, VAEConfig, kl_to_standard_normal
from shared_fixtures import LazyImport

pytestmark = pytest.mark.costly(seconds=30)  # cold seconds (--durations): costly files start first

torch = LazyImport("torch")
diffusers = LazyImport("diffusers")

# SD 1.5's VAE layout (4 levels, 2 ResNets per level, mid attention, quant convs) at a quarter of its width; and
# a 2-level one without quant convs or mid attention, with a shift factor and 16 latent channels (SD3 / Flux style).
SD15_SMALL = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=32, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=32, scaling_factor=0.18215)
FLAT = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
            scaling_factor=1.5, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=False)


def _torch_vae(config):
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():  # perturb every tensor, so unit norms and zero biases are exercised too
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _numpy_state(model):
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _ours(model):
  config = vae_config_from_diffusers(dict(model.config))
  vae = AutoencoderKL(config, rngs=nnx.Rngs(1))
  nnx.update(vae, convert_diffusers_vae(_numpy_state(model), config))
  return vae


@pytest.mark.parametrize("config", [SD15_SMALL, FLAT], ids=["sd15-layout", "no-quant-conv"])
def test_matches_diffusers_encoder_and_decoder(config):
  model = _torch_vae(config)
  vae = _ours(model)
  size = config["sample_size"]
  images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
    mean_t, logvar_t = (posterior.mean.numpy().transpose(0, 2, 3, 1), posterior.logvar.numpy().transpose(0, 2, 3, 1))
    decoded_t = model.decode(posterior.mean).sample.numpy().transpose(0, 2, 3, 1)
  # One compiled program each (eager NNX would compile every op separately: slower here than XLA's one compile).
  mean, logvar = nnx.jit(lambda m, x: m.encode(x))(vae, jnp.asarray(images))
  decoded = nnx.jit(lambda m, z: m.decode(z))(vae, mean)
  factor = 2**(len(config["block_out_channels"]) - 1)
  assert mean.shape == (2, size // factor, size // factor, config["latent_channels"])
  assert float(jnp.std(mean)) > 0.05 and float(jnp.std(decoded)) > 0.05  # not a degenerate comparison
  for ours, theirs in ((mean, mean_t), (logvar, logvar_t), (decoded, decoded_t)):
    assert np.abs(np.asarray(ours) - theirs).max() < 1e-4
  kl_t = posterior.kl().numpy()
  np.testing.assert_allclose(np.asarray(kl_to_standard_normal(mean, logvar)), kl_t, rtol=1e-4)


def test_latent_scaling_is_the_config_affine_map():
  vae = AutoencoderKL(VAEConfig(**{k: v for k, v in FLAT.items() if "block_types" not in k}), rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)

  @nnx.jit
  def outputs(m, x):
    mean, logvar = m.encode(x)
    latents = m.encode_latents(x)
    return mean, logvar, latents, m.decode_latents(latents), m.decode(mean), m.encode_latents(x, jax.random.key(0))

  mean, logvar, latents, decoded_latents, decoded_mean, sampled = outputs(vae, images)
  np.testing.assert_allclose(np.asarray(latents), (np.asarray(mean) - 0.1159) * 1.5, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(decoded_latents), np.asarray(decoded_mean), atol=1e-5)
  noise = (np.asarray(sampled) / 1.5 + 0.1159 - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
  np.testing.assert_allclose(noise, np.asarray(jax.random.normal(jax.random.key(0), mean.shape)), atol=1e-3)


def test_loads_a_saved_diffusers_folder_and_legacy_attention_names(tmp_path):
  model = _torch_vae(SD15_SMALL)
  model.save_pretrained(str(tmp_path / "vae"))
  vae = load_diffusers_vae(str(tmp_path / "vae"))
  ref = _ours(model)
  ours, theirs = nnx.to_flat_state(nnx.state(vae, nnx.Param)), dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
  assert len(ours) == len(theirs) and all(np.array_equal(v.get_value(), theirs[k].get_value()) for k, v in ours)

  # Before diffusers 0.14 the mid-block attention was query / key / value / proj_attn (1x1 convolutions in the
  # original LDM checkpoints): the same weights under those names load to the same model.
  legacy = {}
  for key, value in _numpy_state(model).items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f"attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        value = value[:, :, None, None] if value.ndim == 2 else value
    legacy[key] = value
  config = vae_config_from_diffusers(str(tmp_path / "vae"))
  converted = dict(nnx.to_flat_state(convert_diffusers_vae(legacy, config)))
  assert all(np.array_equal(converted[k].get_value(), v.get_value()) for k, v in ours)


def test_our_config_reads_back_in_diffusers():
  config = vae_config_from_diffusers(dict(_torch_vae(FLAT).config))
  rebuilt = diffusers.AutoencoderKL.from_config(diffusers_vae_config(config))
  assert vae_config_from_diffusers(dict(rebuilt.config)) == config


def test_saved_folder_loads_in_diffusers_with_the_same_weights(tmp_path):
  """Ours -> a diffusers folder -> diffusers' from_pretrained: every tensor equal, and the same decoded image."""
  model = _torch_vae(SD15_SMALL)
  vae = _ours(model)
  save_diffusers_vae(vae, str(tmp_path / "vae"))
  loaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
  theirs, back = _numpy_state(model), _numpy_state(loaded)
  assert theirs.keys() == back.keys() and all(np.array_equal(theirs[k], back[k]) for k in theirs)
  assert dict(loaded.config)["scaling_factor"] == SD15_SMALL["scaling_factor"]


@pytest.mark.parametrize("change,message", [
    (dict(_class_name="AutoencoderTiny"), "unsupported diffusers VAE class 'AutoencoderTiny'"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "unsupported diffusers VAE block"),
    (dict(latents_mean=[0.0] * 4), "unsupported diffusers VAE option latents_mean"),
    (dict(mystery=1), "unknown diffusers VAE config key 'mystery'"),
    (dict(norm_num_groups=5), "5 groups do not divide 16 channels"),
])
def test_config_errors_name_the_problem(change, message):
  config = dict(FLAT, **change)
  with pytest.raises(ValueError, match=message):
    vae_config_from_diffusers(config)


def test_weight_errors_name_the_key(tmp_path):
  model = _torch_vae(FLAT)
  config = vae_config_from_diffusers(dict(model.config))
  state = _numpy_state(model)
  missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
  with pytest.raises(ValueError, match="missing key in diffusers VAE checkpoint: decoder.conv_out.bias"):
    convert_diffusers_vae(missing, config)
  wrong = dict(state, **{"encoder.conv_in.weight": np.zeros((16, 4, 3, 3), np.float32)})
  with pytest.raises(ValueError, match="shape mismatch for diffusers VAE key encoder.conv_in.weight"):
    convert_diffusers_vae(wrong, config)
  (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
  with pytest.raises(ValueError, match="no diffusion_pytorch_model.safetensors"):
    load_diffusers_vae(str(tmp_path))


def test_sd15_vae_keys_and_shapes_match_without_allocating():
  """SD 1.5's own VAE config (83,653,863 parameters), on torch's meta device: every key and shape maps."""
  from suti.models.convert_vae import diffusers_vae_key_map
  from suti.models.diffusers_layout import check_shapes

  sd15 = dict(SD15_SMALL, block_out_channels=(128, 256, 512, 512), sample_size=512)
  with torch.device("meta"):
    model = diffusers.AutoencoderKL(**sd15)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
  config = vae_config_from_diffusers(dict(model.config))
  check_shapes(shapes, diffusers_vae_key_map(config), "VAE")
  assert config.downsample_factor == 8
