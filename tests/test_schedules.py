"""Schedules: closed forms, monotonicity, q_sample statistics, eps / x0 / v conversions."""
import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from suti.diffusion import schedules as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("schedule", [
    S.cosine_schedule(1000), S.linear_schedule(1000), S.linear_schedule(1000, 0.00085, 0.012, scaled=True),
    S.cosine_schedule(7)])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(schedule):
  acp = np.asarray(schedule.alphas_cumprod)
  assert acp.shape == (schedule.num_timesteps,)
  assert np.all(np.diff(acp) < 0)
  assert acp[0] < 1 and acp[-1] > 0
  np.testing.assert_allclose(acp, np.cumprod(1 - np.asarray(schedule.betas, np.float64)), rtol=1e-4)


def test_cosine_matches_closed_form_and_clips_last_beta():
  T, s = 1000, 0.008
  sched = S.cosine_schedule(T, s)
  u = (np.arange(T) + 1) / T
  expected = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
  # alpha_bar(1) = 0 makes the last beta 1, clipped to 0.999; all earlier values are unclipped.
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod)[:-1], expected[:-1], rtol=1e-4, atol=1e-9)
  assert float(sched.betas[-1]) == pytest.approx(0.999)
  assert float(jnp.max(sched.betas)) <= 0.999 + 1e-7


def test_linear_and_scaled_linear_betas():
  lin = np.asarray(S.linear_schedule(1000, 1e-4, 0.02).betas, np.float64)
  assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
  np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / 999, rtol=1e-3)
  sd = S.linear_schedule(1000, 0.00085, 0.012, scaled=True)
  root = np.sqrt(np.asarray(sd.betas, np.float64))
  np.testing.assert_allclose(np.diff(root), (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-3)
  # Stable Diffusion's terminal signal scale sqrt(alphas_cumprod[999]) = 0.0683 (Lin et al. 2024, Table 1).
  assert float(jnp.sqrt(sd.alphas_cumprod[-1])) == pytest.approx(0.0683, abs=5e-4)


def test_alpha_sigma_snr():
  sched = S.cosine_schedule(100)
  t = jnp.arange(100)
  a, s = sched.alpha(t), sched.sigma(t)
  np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(sched.snr(t), a**2 / s**2, rtol=1e-4)
  assert np.all(np.diff(np.asarray(sched.snr(t))) < 0)


def test_q_sample_statistics():
  sched = S.cosine_schedule(1000)
  t = jnp.array([0, 300, 600, 999])
  x0 = jnp.full((4, 20000), 0.5)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = sched.q_sample(x0, t, noise)
  np.testing.assert_allclose(x_t.mean(axis=1), 0.5 * sched.alpha(t), atol=0.02)
  np.testing.assert_allclose(x_t.std(axis=1), sched.sigma(t), rtol=0.03, atol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_conversions_round_trip(prediction):
  sched = S.cosine_schedule(1000)
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 200, 500, 800, 950])
  x_t = sched.q_sample(x0, t, eps)
  a, s = S.broadcast_like(sched.alpha(t), x0), S.broadcast_like(sched.sigma(t), x0)
  v = S.v_from_x0_eps(x0, eps, a, s)
  np.testing.assert_allclose(S.x0_from_v(x_t, v, a, s), x0, atol=1e-4)
  np.testing.assert_allclose(S.eps_from_v(x_t, v, a, s), eps, atol=1e-4)
  np.testing.assert_allclose(S.eps_from_x0(x_t, x0, a, s), eps, atol=2e-3)  # divides by sigma(0) ~ 0.006
  np.testing.assert_allclose(S.x0_from_eps(x_t, eps, a, s), x0, atol=1e-4)
  output = sched.target(x0, eps, t, prediction)
  np.testing.assert_allclose(output, eps if prediction == "eps" else v, atol=1e-6)
  x0_hat, eps_hat = sched.x0_eps(x_t, t, output, prediction)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)


def test_schedule_is_a_pytree_through_jit():
  sched = S.cosine_schedule(50)
  assert len(jax.tree_util.tree_leaves(sched)) == 2
  total = jax.jit(lambda sc, t: sc.alpha(t).sum())(sched, jnp.arange(50))
  assert float(total) == pytest.approx(float(jnp.sqrt(sched.alphas_cumprod).sum()), rel=1e-6)


def test_make_schedule_from_configs():
  from suti.config import load_config
  toy_cfg = load_config(os.path.join(ROOT, "configs", "toy.py")).diffusion
  assert np.array_equal(S.make_schedule(toy_cfg).alphas_cumprod, S.cosine_schedule(1000).alphas_cumprod)
  sd = S.make_schedule(load_config(os.path.join(ROOT, "configs", "sd15.py")).diffusion)
  assert np.array_equal(sd.betas, S.linear_schedule(1000, 0.00085, 0.012, scaled=True).betas)
  scaled = S.make_schedule({"schedule": "scaled_linear", "num_timesteps": 10, "beta_start": 0.00085,
                            "beta_end": 0.012})
  assert np.array_equal(scaled.betas, S.linear_schedule(10, 0.00085, 0.012, scaled=True).betas)


@pytest.mark.parametrize("cfg, match", [
    ({"schedule": "sigmoid", "num_timesteps": 10}, "diffusion.schedule"),
    ({"schedule": "cosine"}, "num_timesteps"),
    ({"schedule": "linear", "num_timesteps": 10, "beta_start": 0.1, "beta_end": 0.01}, "beta_start"),
    ({"schedule": "cosine", "num_timesteps": 1}, "num_timesteps"),
])
def test_bad_schedule_configs_raise(cfg, match):
  with pytest.raises(ValueError, match=match):
    S.make_schedule(mlc.ConfigDict(cfg))


def test_bad_prediction_raises():
  sched = S.cosine_schedule(10)
  with pytest.raises(ValueError, match="prediction"):
    sched.target(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), "x0")


@pytest.mark.parametrize("change,message", [
    (dict(timestep_spacing="even"), "diffusion.timestep_spacing must be one of"),
    (dict(steps_offset=-1), "diffusion.steps_offset must be an integer >= 0"),
    (dict(set_alpha_to_one="yes"), "diffusion.set_alpha_to_one must be True or False"),
])
def test_sampling_settings_of_a_schedule_are_checked(change, message):
  with pytest.raises(ValueError, match=message):
    S.make_schedule(dict(schedule="cosine", num_timesteps=1000, **change))
  assert S.make_schedule(dict(schedule="cosine", num_timesteps=1000)).timestep_spacing == "trailing"
