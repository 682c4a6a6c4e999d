"""The project's DDIM and DPM-Solver++(2M) on a schedule made from a diffusers scheduler config walk the same
timesteps and land on the same sample as diffusers' DDIMScheduler (SD 1.5's config: leading + 1, last alpha
alphas_cumprod[0]; SD 2's style: v prediction, trailing, last alpha 1) and DPMSolverMultistepScheduler (dpmsolver++,
order 2, final sigma 0; leading, linspace and trailing spacing)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import suti  # noqa: F401  (installs the torchvision shim before diffusers is imported)
from suti.diffusion import samplers as SM
from suti.diffusion.schedules import make_schedule
from shared_fixtures import LazyImport

pytestmark = pytest.mark.costly(seconds=10)  # cold seconds (--durations): costly files start first

torch = LazyImport("torch")
diffusers = LazyImport("diffusers")

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
            timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
SD2_STYLE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                 timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True)


def _ours(config):
  return make_schedule(dict(schedule=config["beta_schedule"], num_timesteps=1000, beta_start=config["beta_start"],
                            beta_end=config["beta_end"], timestep_spacing=config["timestep_spacing"],
                            steps_offset=config["steps_offset"], set_alpha_to_one=config["set_alpha_to_one"]))


def _model(x, t, lib):
  """A fixed, nonlinear stand-in for a denoiser, written once for torch and once for jax."""
  return 0.5 * lib.tanh(x) + 0.0004 * t


@pytest.mark.parametrize("config", [SD15, SD2_STYLE], ids=["sd15", "sd2-style"])
def test_ddim_matches_diffusers_ddim_scheduler(config):
  theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **config)
  schedule = _ours(config)
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), theirs.alphas_cumprod.numpy(), rtol=1e-6)

  theirs.set_timesteps(10)
  ours_t = SM.sampling_timesteps(1000, 10, config["timestep_spacing"], config["steps_offset"])
  np.testing.assert_array_equal(ours_t, theirs.timesteps.numpy())

  x_T = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
  x = torch.from_numpy(x_T)
  for t in theirs.timesteps:
    x = theirs.step(_model(x, float(t), torch), t, x).prev_sample
  prediction = "eps" if config["prediction_type"] == "epsilon" else "v"
  denoise = lambda x, t, rng: _model(x, t[:, None, None, None].astype(jnp.float32), jnp)
  ours = SM.ddim_sample(denoise, jnp.asarray(x_T), jax.random.key(0), schedule, 10, prediction=prediction)
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=2e-5, rtol=1e-5)
  if not config["set_alpha_to_one"]:  # the last step lands on alphas_cumprod[0], not on alpha = 1
    one = schedule.replace(set_alpha_to_one=True)
    landed_clean = SM.ddim_sample(denoise, jnp.asarray(x_T), jax.random.key(0), one, 10, prediction=prediction)
    assert np.abs(np.asarray(landed_clean) - x.numpy()).max() > 1e-3


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("linspace", 0), ("trailing", 0)])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(spacing, offset):
  config = dict(SD15, timestep_spacing=spacing, steps_offset=offset)
  theirs = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_schedule=config["beta_schedule"], beta_start=config["beta_start"],
      beta_end=config["beta_end"], prediction_type="epsilon", timestep_spacing=spacing, steps_offset=offset,
      algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
  theirs.set_timesteps(8)
  np.testing.assert_array_equal(SM.sampling_timesteps(1000, 8, spacing, offset, multistep=True),
                                theirs.timesteps.numpy())
  x_T = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
  x = torch.from_numpy(x_T)
  for t in theirs.timesteps:
    x = theirs.step(_model(x, float(t), torch), t, x).prev_sample
  denoise = lambda x, t, rng: _model(x, t[:, None, None, None].astype(jnp.float32), jnp)
  ours = SM.dpmpp_2m_sample(denoise, jnp.asarray(x_T), jax.random.key(0), _ours(config), 8, prediction="eps")
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-4, rtol=1e-5)  # |x| reaches 37 here
