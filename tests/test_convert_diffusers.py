"""diffusers UNet2DConditionModel (PyTorch) -> our UNet: key mapping, layouts, numerics."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

import suti.core.torch_compat  # noqa: F401  (before diffusers: see suti/core/torch_compat.py)
from suti.models.convert_diffusers import convert_diffusers_unet, load_diffusers_unet, unet_config_from_diffusers
from suti.models.unet import UNet
from shared_fixtures import LazyImport

pytestmark = pytest.mark.costly(seconds=45)  # cold seconds (--durations): costly files start first

torch = LazyImport("torch")
diffusers = LazyImport("diffusers")

SMALL = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, cross_attention_dim=32,
             attention_head_dim=4, flip_sin_to_cos=True, freq_shift=0)


def _torch_unet(use_linear_projection: bool, resnet_time_scale_shift: str = "default"):
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**SMALL, use_linear_projection=use_linear_projection,
                                         resnet_time_scale_shift=resnet_time_scale_shift).eval()
  with torch.no_grad():  # perturb every tensor so zero-initialised ones and unit norms are exercised too
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("use_linear_projection,resnet_time_scale_shift",
                         [(True, "default"), (False, "default"), (True, "scale_shift")])
def test_matches_diffusers_forward(tmp_path, use_linear_projection, resnet_time_scale_shift):
  from safetensors.numpy import save_file

  model = _torch_unet(use_linear_projection, resnet_time_scale_shift)
  path = str(tmp_path / "unet.safetensors")
  save_file(_numpy_state(model), path)

  config = unet_config_from_diffusers(dict(model.config))
  assert config.use_linear_projection == use_linear_projection and config.num_attention_heads == 4
  assert config.resnet_time_scale_shift == resnet_time_scale_shift
  ours = UNet(config, rngs=nnx.Rngs(1))
  load_diffusers_unet(path, ours)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  t = np.array([3, 917], np.int64)
  context = rng.standard_normal((2, 7, 32)).astype(np.float32)
  mask = np.ones((2, 7), bool)
  mask[1, 4:] = False
  with torch.no_grad():
    want = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                 encoder_attention_mask=torch.from_numpy(mask)).sample.numpy()

  graphdef, state = nnx.split(ours)
  run = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
  got = np.asarray(run(state, x.transpose(0, 2, 3, 1), t.astype(np.int32), context, mask)).transpose(0, 3, 1, 2)
  assert np.abs(want).max() > 0.1  # a real signal, not a degenerate all-zero output
  np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


def test_conversion_errors_name_the_key():
  model = _torch_unet(True)
  config = unet_config_from_diffusers(dict(model.config))
  state = _numpy_state(model)

  missing = dict(state)
  del missing["mid_block.attentions.0.proj_in.weight"]
  with pytest.raises(ValueError, match="missing key.*mid_block.attentions.0.proj_in.weight"):
    convert_diffusers_unet(missing, config)

  extra = dict(state, **{"class_embedding.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="unexpected key.*class_embedding.weight"):
    convert_diffusers_unet(extra, config)

  wrong = dict(state)
  wrong["conv_in.weight"] = np.zeros((32, 3, 3, 3), np.float32)
  with pytest.raises(ValueError, match="shape mismatch.*conv_in.weight"):
    convert_diffusers_unet(wrong, config)


def test_conversion_layouts_and_renames():
  model = _torch_unet(False)
  config = unet_config_from_diffusers(dict(model.config))
  state = _numpy_state(model)
  flat = dict(nnx.to_flat_state(convert_diffusers_unet(state, config)))
  assert len(flat) == len(state)  # one parameter per checkpoint tensor, none left out

  def value(*path):
    return np.asarray(flat[path].get_value())

  np.testing.assert_array_equal(value("conv_in", "kernel"), state["conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(value("time_embedding", "linear_1", "kernel"),
                                state["time_embedding.linear_1.weight"].T)
  block = ("down_blocks", 0, "attentions", 1)
  key = "down_blocks.0.attentions.1."
  np.testing.assert_array_equal(value(*block, "proj_in", "kernel"), state[key + "proj_in.weight"][:, :, 0, 0].T)
  tb = block + ("transformer_blocks", 0)
  np.testing.assert_array_equal(value(*tb, "attn2", "to_out", "kernel"),
                                state[key + "transformer_blocks.0.attn2.to_out.0.weight"].T)
  np.testing.assert_array_equal(value(*tb, "ff", "proj_in", "bias"),
                                state[key + "transformer_blocks.0.ff.net.0.proj.bias"])
  np.testing.assert_array_equal(value(*tb, "ff", "proj_out", "kernel"),
                                state[key + "transformer_blocks.0.ff.net.2.weight"].T)
  np.testing.assert_array_equal(value(*tb, "norm3", "scale"), state[key + "transformer_blocks.0.norm3.weight"])


def test_config_from_diffusers_rejects_unsupported_options():
  base = dict(SMALL, use_linear_projection=True)
  with pytest.raises(ValueError, match="class_embed_type"):
    unet_config_from_diffusers(dict(base, class_embed_type="timestep"))
  with pytest.raises(ValueError, match="unsupported diffusers UNet option resnet_time_scale_shift='spatial'"):
    unet_config_from_diffusers(dict(base, resnet_time_scale_shift="spatial"))
  assert unet_config_from_diffusers(base).resnet_time_scale_shift == "default"  # diffusers' default when absent
  apprentice = unet_config_from_diffusers(base, num_neighbors=3, neighbor_token_resolutions=(8,),
                                          neighbor_attn_resolutions=(8,))
  assert apprentice.num_neighbors == 3 and apprentice.image_size == 16


def test_base_checkpoint_loads_into_an_apprentice(tmp_path):
  from safetensors.numpy import save_file

  from suti.models.neighbors import is_neighbor_param

  model = _torch_unet(True)
  path = str(tmp_path / "unet.safetensors")
  save_file(_numpy_state(model), path)
  base_cfg = unet_config_from_diffusers(dict(model.config))
  apprentice = UNet(unet_config_from_diffusers(dict(model.config), num_neighbors=2, neighbor_token_resolutions=(8,),
                                               neighbor_attn_resolutions=(8, 16)), rngs=nnx.Rngs(0))
  load_diffusers_unet(path, apprentice)
  converted = dict(nnx.to_flat_state(convert_diffusers_unet(_numpy_state(model), base_cfg)))
  loaded = dict(nnx.to_flat_state(nnx.state(apprentice, nnx.Param)))
  assert set(converted) == {p for p in loaded if not is_neighbor_param(p)}
  for p, v in converted.items():
    np.testing.assert_array_equal(np.asarray(loaded[p].get_value()), np.asarray(v.get_value()))
  out_kernels = [v for p, v in loaded.items() if is_neighbor_param(p) and p[-2:] == ("to_out", "kernel")]
  assert len(out_kernels) == 1 + 3 + 3  # mid block + both up blocks (8x8 and 16x16), zero-initialised
  assert all(not np.asarray(v.get_value()).any() for v in out_kernels)



def test_sd15_diffusers_keys_and_shapes_match_without_allocating():
  import os

  from suti.config import load_config
  from suti.models.convert_diffusers import check_diffusers_shapes
  from suti.models.unet_config import UNetConfig

  with torch.device("meta"):  # SD 1.5's UNet (diffusers defaults + 768-wide text), no memory allocated
    model = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert sum(math.prod(s) for s in shapes.values()) == 859_520_964
  config = unet_config_from_diffusers(dict(model.config))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert config == UNetConfig.from_config(load_config(os.path.join(root, "configs", "sd15.py")).model).replace(
      text_in_time_embedding=False, neighbor_token_resolutions=(), neighbor_attn_resolutions=())
  check_diffusers_shapes(shapes, config)
  shapes["mid_block.attentions.0.proj_out.weight"] = (1280, 1280, 3, 3)
  with pytest.raises(ValueError, match="shape mismatch for diffusers UNet key mid_block.attentions.0.proj_out.weight"):
    check_diffusers_shapes(shapes, config)
