"""Samplers against the exact optimal denoiser of Gaussian data, plus thresholding.

For x0 ~ N(mu, s^2) per dimension and x_t = a x0 + sigma eps, (x_t, eps) are jointly Gaussian, so
  E[eps | x_t] = Cov(eps, x_t) / Var(x_t) (x_t - a mu) = sigma (x_t - a mu) / (a^2 s^2 + sigma^2)
  E[x0 | x_t]  = mu + a s^2 (x_t - a mu) / (a^2 s^2 + sigma^2)
  E[v | x_t]   = a E[eps | x_t] - sigma E[x0 | x_t]
and the probability-flow ODE maps x_t to x0 = mu + s (x_t - a mu) / sqrt(a^2 s^2 + sigma^2) (the only
monotone map that carries N(a mu, a^2 s^2 + sigma^2) to N(mu, s^2)): an exact per-sample reference.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti.diffusion import samplers as SM
from suti.diffusion.schedules import broadcast_like, cosine_schedule, linear_schedule
from suti.diffusion.thresholding import dynamic_threshold, make_x0_fn, static_clip

pytestmark = pytest.mark.costly(seconds=50)  # cold seconds (--durations): costly files start first

MU, STD = 0.7, 0.3
SCHEDULE = cosine_schedule(1000)
X_T = jax.random.normal(jax.random.key(0), (2000, 2, 2))  # 8000 independent dimensions


def optimal_denoiser(prediction, schedule=SCHEDULE, mu=MU, std=STD):
  def denoise(x, t, step_rng):
    a, s = broadcast_like(schedule.alpha(t), x), broadcast_like(schedule.sigma(t), x)
    var = a**2 * std**2 + s**2
    eps = s * (x - a * mu) / var
    if prediction == "eps":
      return eps
    return a * eps - s * (mu + a * std**2 * (x - a * mu) / var)
  return denoise


def ode_solution(x_T, t, schedule=SCHEDULE):
  a, s = schedule.alpha(t), schedule.sigma(t)
  return MU + STD * (x_T - a * MU) / jnp.sqrt(a**2 * STD**2 + s**2)


def run(sampler, steps, prediction="eps", x_T=X_T, seed=1, **kw):
  fn = jax.jit(lambda x, r: SM.sample(optimal_denoiser(prediction), x, r, SCHEDULE, steps,
                                      sampler=sampler, prediction=prediction, **kw))
  return fn(x_T, jax.random.key(seed))


def test_sampling_timesteps_spacings():
  np.testing.assert_array_equal(SM.sampling_timesteps(1000, 10, "trailing"), np.arange(999, 0, -100))
  np.testing.assert_array_equal(SM.sampling_timesteps(1000, 10, "leading"), np.arange(900, -1, -100))
  lin = SM.sampling_timesteps(1000, 7, "linspace")
  assert lin[0] == 999 and lin[-1] == 0 and len(lin) == 7
  for spacing in SM.SPACINGS:
    for steps in (1, 3, 333, 999, 1000):
      ts = SM.sampling_timesteps(1000, steps, spacing)
      assert len(ts) == steps and len(set(ts.tolist())) == steps and ts.dtype == np.int32
  np.testing.assert_array_equal(SM.sampling_timesteps(1000, 1000, "trailing"), np.arange(999, -1, -1))
  with pytest.raises(ValueError, match="steps"):
    SM.sampling_timesteps(1000, 1001)
  with pytest.raises(ValueError, match="spacing"):
    SM.sampling_timesteps(1000, 10, "middle")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_deterministic_samplers_reproduce_the_data_distribution(prediction):
  exact = ode_solution(X_T, 999)
  for sampler, steps, tol in [("ddim", 500, 0.01), ("dpm++", 50, 1e-3)]:
    x0 = run(sampler, steps, prediction)
    assert abs(float(x0.mean()) - MU) < 0.01, sampler
    assert abs(float(x0.std()) - STD) < 0.01, sampler
    assert float(jnp.abs(x0 - exact).max()) < tol, sampler


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_beats_ddim_at_ten_steps(prediction):
  exact = ode_solution(X_T, 999)
  ddim_err = float(jnp.abs(run("ddim", 10, prediction) - exact).mean())
  dpm_err = float(jnp.abs(run("dpm++", 10, prediction) - exact).mean())
  assert dpm_err < 0.75 * ddim_err, (dpm_err, ddim_err)
  # and the first-order solver converges: more steps, smaller error
  assert float(jnp.abs(run("ddim", 40, prediction) - exact).mean()) < 0.5 * ddim_err


def test_ddpm_full_chain_matches_the_data_distribution():
  x0 = run("ddpm", None)
  assert abs(float(x0.mean()) - MU) < 0.02
  assert abs(float(x0.std()) - STD) < 0.02
  # it is stochastic: it does not follow the deterministic ODE map
  assert float(jnp.abs(x0 - ode_solution(X_T, 999)).mean()) > 0.05


def test_ddpm_equals_ddim_with_eta_one():
  """Two different formulas for the same posterior step, with the same noise draws."""
  ddpm = run("ddpm", 20, seed=3)
  ddim1 = run("ddim", 20, seed=3, eta=1.0)
  np.testing.assert_allclose(ddpm, ddim1, atol=2e-4)
  assert float(jnp.abs(ddim1 - run("ddim", 20, seed=3)).mean()) > 0.05  # eta changes the result


def test_eps_and_v_parametrisations_agree():
  for sampler in ("ddim", "dpm++", "ddpm"):
    np.testing.assert_allclose(run(sampler, 25, "eps"), run(sampler, 25, "v"), atol=1e-3)


def test_leading_and_linear_schedule_paths_run():
  sched = linear_schedule(1000)
  fn = optimal_denoiser("eps", schedule=sched)
  x0 = SM.ddim_sample(fn, X_T, jax.random.key(0), sched, 100, spacing="leading")
  # leading starts at t = 990 < T-1; the linear schedule is close enough to pure noise there
  assert abs(float(x0.mean()) - MU) < 0.02 and abs(float(x0.std()) - STD) < 0.02


def test_sampler_traces_the_denoiser_once_under_jit():
  calls = []

  def denoise(x, t, rng):
    calls.append(1)
    assert t.shape == (x.shape[0],) and t.dtype == jnp.int32
    return optimal_denoiser("eps")(x, t, rng)

  for sampler in ("ddim", "dpm++", "ddpm"):
    calls.clear()
    jax.jit(lambda x, r: SM.sample(denoise, x, r, SCHEDULE, 30, sampler=sampler))(X_T[:4], jax.random.key(0))
    assert len(calls) == 1, sampler


def test_denoiser_sees_the_planned_timesteps_and_distinct_step_rngs():
  seen_t, seen_rng = [], []

  def denoise(x, t, rng):
    seen_t.append(int(t[0]))
    seen_rng.append(tuple(np.asarray(jax.random.key_data(rng)).ravel()))
    return jnp.zeros_like(x)

  SM.ddim_sample(denoise, X_T[:2], jax.random.key(0), SCHEDULE, 5, progress=True)
  assert seen_t == [999, 799, 599, 399, 199]
  assert len(set(seen_rng)) == 5


def test_progress_loop_matches_the_fused_loop():
  for sampler, kw in [("ddim", {"eta": 0.5}), ("dpm++", {}), ("ddpm", {})]:
    fused = run(sampler, 8, x_T=X_T[:16], **kw)
    hosted = SM.sample(optimal_denoiser("eps"), X_T[:16], jax.random.key(1), SCHEDULE, 8, sampler=sampler,
                       progress=True, **kw)
    np.testing.assert_allclose(fused, hosted, atol=1e-5)


def test_x0_fn_is_applied_to_predictions():
  # Data far outside [-1, 1]: with static clipping every prediction, and so the result, stays inside.
  far = optimal_denoiser("eps", mu=5.0, std=0.1)
  for sampler in ("ddim", "dpm++", "ddpm"):
    out = SM.sample(far, X_T[:64], jax.random.key(0), SCHEDULE, 20, sampler=sampler, x0_fn=static_clip)
    assert float(out.max()) <= 1.0 + 1e-5 and float(out.min()) >= -1.0 - 1e-5, sampler
    free = SM.sample(far, X_T[:64], jax.random.key(0), SCHEDULE, 20, sampler=sampler)
    assert float(free.mean()) > 4.5, sampler


def test_bfloat16_state_keeps_its_dtype():
  out = run("dpm++", 5, x_T=X_T[:8].astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16


def test_bad_sampler_and_prediction_raise():
  with pytest.raises(ValueError, match="sampler"):
    run("euler", 10)
  with pytest.raises(ValueError, match="prediction"):
    run("ddim", 10, prediction="x0")


def test_dynamic_threshold_known_array():
  x = jnp.array([[-4.0, -2.0, 0.5, 1.0],   # |x| sorted 0.5 1 2 4: 50th percentile 1.5
                 [-0.9, 0.1, 0.2, 0.8]])    # inside [-1, 1]: s = max(0.85, 1) = 1, unchanged
  out = dynamic_threshold(x, 0.5)
  np.testing.assert_allclose(out[0], np.array([-1.5, -1.5, 0.5, 1.0]) / 1.5, rtol=1e-6)
  np.testing.assert_array_equal(out[1], x[1])
  np.testing.assert_allclose(dynamic_threshold(x, 1.0)[0], x[0] / 4.0, rtol=1e-6)
  img = jnp.stack([jnp.linspace(-3, 3, 48).reshape(4, 4, 3), jnp.zeros((4, 4, 3))])
  out = dynamic_threshold(img, 0.995)
  assert out.shape == img.shape and float(jnp.abs(out).max()) <= 1.0


def test_static_clip_and_x0_fn_choice():
  x = jnp.array([[-3.0, 0.25, 2.0]])
  np.testing.assert_array_equal(static_clip(x), jnp.array([[-1.0, 0.25, 1.0]]))
  assert make_x0_fn(0.0) is None
  assert make_x0_fn(0.0, clip=True) is static_clip
  np.testing.assert_array_equal(make_x0_fn(0.5)(x), dynamic_threshold(x, 0.5))
  with pytest.raises(ValueError, match="percentile"):
    make_x0_fn(99.5)
