"""Training loss: targets, min-SNR-gamma weights (closed form), timestep sampling, the full loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti.diffusion import losses as L
from suti.diffusion.schedules import broadcast_like, cosine_schedule

SCHEDULE = cosine_schedule(1000)


def test_min_snr_weights_closed_form():
  t = jnp.array([0, 50, 200, 400, 600, 999])
  snr = np.asarray(SCHEDULE.snr(t), np.float64)
  gamma = 5.0
  assert snr[0] > gamma > snr[-1]  # both regimes are covered
  np.testing.assert_allclose(L.min_snr_weights(t, SCHEDULE, "eps", gamma), np.minimum(snr, gamma) / snr,
                             rtol=1e-5)
  np.testing.assert_allclose(L.min_snr_weights(t, SCHEDULE, "v", gamma),
                             np.minimum(snr, gamma) / (snr + 1), rtol=1e-5)
  # below gamma: eps weight 1, v weight snr / (snr + 1); above: gamma / snr and gamma / (snr + 1)
  low = snr < gamma
  np.testing.assert_allclose(np.asarray(L.min_snr_weights(t, SCHEDULE, "eps", gamma))[low], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(L.min_snr_weights(t, SCHEDULE, "eps", 0.0), np.ones(6))
  np.testing.assert_array_equal(L.min_snr_weights(t, SCHEDULE, "v", 0.0), np.ones(6))


def test_weighted_mse_closed_form():
  t = jnp.array([10, 300, 900])
  target = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
  offsets = jnp.array([0.5, 1.0, 2.0])
  pred = target + offsets[:, None, None, None]
  np.testing.assert_allclose(L.per_example_mse(pred, target), offsets**2, rtol=1e-5)
  assert float(L.weighted_mse(pred, target, t, SCHEDULE)) == pytest.approx(float(jnp.mean(offsets**2)), rel=1e-5)
  w = L.min_snr_weights(t, SCHEDULE, "v", 5.0)
  assert float(L.weighted_mse(pred, target, t, SCHEDULE, "v", 5.0)) == pytest.approx(
      float(jnp.mean(w * offsets**2)), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_targets(prediction):
  x0 = jax.random.uniform(jax.random.key(1), (4, 3, 3, 2), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.key(2), x0.shape)
  t = jnp.array([0, 10, 500, 999])
  x_t, target = L.training_targets(x0, t, noise, SCHEDULE, prediction)
  a, s = broadcast_like(SCHEDULE.alpha(t), x0), broadcast_like(SCHEDULE.sigma(t), x0)
  np.testing.assert_allclose(x_t, a * x0 + s * noise, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(target, noise if prediction == "eps" else a * noise - s * x0, rtol=1e-6, atol=1e-6)


def test_sample_timesteps_uniform():
  t = L.sample_timesteps(jax.random.key(0), 100_000, 1000)
  assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 999
  assert float(t.mean()) == pytest.approx(499.5, abs=3.0)
  counts = np.bincount(np.asarray(t) // 100, minlength=10)
  assert np.all(np.abs(counts - 10_000) < 500)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_vanishes_for_the_exact_predictor(prediction):
  """With x0 = 0, x_t = sigma eps, so eps = x_t / sigma and v = alpha x_t / sigma exactly."""
  x0 = jnp.zeros((256, 4, 4, 1))

  def exact(x_t, t):
    a, s = broadcast_like(SCHEDULE.alpha(t), x_t), broadcast_like(SCHEDULE.sigma(t), x_t)
    return x_t / s if prediction == "eps" else a * x_t / s

  def scaled(c):
    return lambda x_t, t: c * exact(x_t, t)

  rng = jax.random.key(3)
  assert float(L.diffusion_loss(exact, x0, rng, SCHEDULE, prediction)) < 1e-8
  assert float(L.diffusion_loss(exact, x0, rng, SCHEDULE, prediction, min_snr_gamma=5.0)) < 1e-8
  # the zero predictor pays E[eps^2] = 1 (eps) or E[alpha^2 eps^2] = mean alphas_cumprod (v)
  zero_loss = float(L.diffusion_loss(lambda x, t: jnp.zeros_like(x), x0, rng, SCHEDULE, prediction))
  expected = 1.0 if prediction == "eps" else float(SCHEDULE.alphas_cumprod.mean())
  assert zero_loss == pytest.approx(expected, abs=0.06)
  # gradients flow through a closed-over parameter: the loss is minimal at c = 1
  grad = jax.grad(lambda c: L.diffusion_loss(scaled(c), x0, rng, SCHEDULE, prediction))
  assert abs(float(grad(1.0))) < 1e-4 and float(grad(0.5)) < 0 < float(grad(1.5))


def test_bad_prediction_raises():
  with pytest.raises(ValueError, match="prediction"):
    L.min_snr_weights(jnp.array([1]), SCHEDULE, "x0", 5.0)
  with pytest.raises(ValueError, match="prediction"):
    L.diffusion_loss(lambda x, t: x, jnp.zeros((2, 2)), jax.random.key(0), SCHEDULE, "score")
