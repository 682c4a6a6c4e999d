"""Classifier-free guidance (joint and interleaved, plain and batched) and conditioning dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from suti.diffusion import conditioning as C
from suti.diffusion import guidance as G

X = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
T = jnp.array([5, 500, 900], jnp.int32)


def fake_output(x, t, text, neighbors):
  """A distinct, non-linear prediction per conditioning (text / neighbors are bools or [N] bools)."""
  text = jnp.asarray(text, jnp.float32).reshape(-1, 1, 1, 1)
  neighbors = jnp.asarray(neighbors, jnp.float32).reshape(-1, 1, 1, 1)
  return jnp.sin(x * (1.0 + 0.7 * text) + 0.3 * neighbors) + 0.001 * t[:, None, None, None] * (1 + text)


def counted_model():
  calls = []

  def model_apply(x, t, use_text, use_neighbors):
    assert isinstance(use_text, bool) and isinstance(use_neighbors, bool)
    calls.append((use_text, use_neighbors))
    return fake_output(x, t, use_text, use_neighbors)
  return model_apply, calls


def counted_batched_model():
  rows = []

  def model_apply_batched(x, t, text_on, neighbors_on):
    assert text_on.shape == neighbors_on.shape == t.shape == (x.shape[0],)
    rows.append(x.shape[0])
    return fake_output(x, t, text_on, neighbors_on)
  return model_apply_batched, rows


E = {flags: fake_output(X, T, *flags) for flags in [(True, True), (True, False), (False, True), (False, False)]}
FULL, TEXT, NEIGH, NONE = E[(True, True)], E[(True, False)], E[(False, True)], E[(False, False)]


def denoisers(mode, st, sn, eta=0.5):
  plain, _ = counted_model()
  batched, _ = counted_batched_model()
  return [G.guided_denoiser(plain, mode, st, sn, eta), G.guided_denoiser_batched(batched, mode, st, sn, eta)]


@pytest.mark.parametrize("mode", G.GUIDANCE_MODES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_unit_scales_give_the_conditional_prediction_exactly(mode, eta):
  for fn in denoisers(mode, 1.0, 1.0, eta):
    for seed in range(4):
      np.testing.assert_array_equal(fn(X, T, jax.random.key(seed)), FULL)


def test_zero_scales_give_the_unconditional_prediction_exactly():
  for fn in denoisers("joint", 0.0, 0.0):
    np.testing.assert_array_equal(fn(X, T, jax.random.key(0)), NONE)
  # interleaved: text guidance falls back to e(0, n), neighbor guidance to e(c, 0)
  for fn in denoisers("interleaved", 0.0, 0.0, eta=1.0):
    np.testing.assert_array_equal(fn(X, T, jax.random.key(0)), NEIGH)
  for fn in denoisers("interleaved", 0.0, 0.0, eta=0.0):
    np.testing.assert_array_equal(fn(X, T, jax.random.key(0)), TEXT)


def test_joint_guidance_closed_form():
  st, sn = 3.0, 2.0
  expected = NONE + st * (TEXT - NONE) + sn * (FULL - TEXT)
  for fn in denoisers("joint", st, sn):
    np.testing.assert_allclose(fn(X, T, jax.random.key(0)), expected, rtol=1e-5, atol=1e-5)
  w = G.joint_weights(st, sn)
  assert sum(w.values()) == pytest.approx(1.0)


def test_interleaved_eta_selects_the_guidance():
  st, sn = 3.0, 2.0
  text_guided = NEIGH + st * (FULL - NEIGH)
  neighbor_guided = TEXT + sn * (FULL - TEXT)
  for fn in denoisers("interleaved", st, sn, eta=1.0):
    np.testing.assert_allclose(fn(X, T, jax.random.key(0)), text_guided, rtol=1e-5, atol=1e-5)
  for fn in denoisers("interleaved", st, sn, eta=0.0):
    np.testing.assert_allclose(fn(X, T, jax.random.key(0)), neighbor_guided, rtol=1e-5, atol=1e-5)
  # eta = 0.3: every step is one of the two, text guidance about 30% of the time, the same choice
  # in the plain and batched variants for the same step rng.
  plain, batched = [jax.jit(fn) for fn in denoisers("interleaved", st, sn, eta=0.3)]
  picks = []
  for seed in range(200):
    rng = jax.random.key(seed)
    out = plain(X, T, rng)
    is_text = bool(jnp.allclose(out, text_guided, atol=1e-5))
    assert is_text != bool(jnp.allclose(out, neighbor_guided, atol=1e-5))
    np.testing.assert_allclose(batched(X, T, rng), out, atol=1e-5)
    picks.append(is_text)
  assert 0.2 < np.mean(picks) < 0.4


def test_only_needed_predictions_are_computed():
  cases = [  # (mode, st, sn, eta, plain calls, batched rows in units of B)
      ("joint", 3.0, 2.0, 0.5, 3, 3), ("joint", 1.0, 1.0, 0.5, 1, 1), ("joint", 4.0, 4.0, 0.5, 2, 2),
      ("joint", 0.0, 0.0, 0.5, 1, 1), ("interleaved", 3.0, 2.0, 1.0, 2, 2),
      ("interleaved", 3.0, 2.0, 0.5, 2, 2), ("interleaved", 1.0, 1.0, 0.5, 1, 1)]
  b = X.shape[0]
  for mode, st, sn, eta, n_calls, n_rows in cases:
    plain, calls = counted_model()
    batched, rows = counted_batched_model()
    G.guided_denoiser(plain, mode, st, sn, eta)(X, T, jax.random.key(0))
    G.guided_denoiser_batched(batched, mode, st, sn, eta)(X, T, jax.random.key(0))
    if mode == "joint" or eta in (0.0, 1.0) or n_calls == 1:
      assert len(calls) == n_calls, (mode, st, sn, calls)
    assert rows == [n_rows * b], (mode, st, sn, rows)  # a single forward pass


def test_make_guided_denoiser_from_config():
  import ml_collections as mlc
  cfg = mlc.ConfigDict({"text_scale": 3.0, "neighbor_scale": 2.0, "guidance_mode": "joint",
                        "interleave_eta": 0.5})
  batched, rows = counted_batched_model()
  np.testing.assert_allclose(G.make_guided_denoiser(batched, cfg)(X, T, jax.random.key(0)),
                             NONE + 3 * (TEXT - NONE) + 2 * (FULL - TEXT), rtol=1e-5, atol=1e-5)
  # a model without neighbors: plain text guidance with two rows
  rows.clear()
  out = G.make_guided_denoiser(batched, cfg, has_neighbors=False)(X, T, jax.random.key(0))
  np.testing.assert_allclose(out, NONE + 3 * (FULL - NONE), rtol=1e-5, atol=1e-5)
  assert rows == [2 * X.shape[0]]


def test_bad_guidance_arguments_raise():
  plain, _ = counted_model()
  with pytest.raises(ValueError, match="mode"):
    G.guided_denoiser(plain, "alternating")
  with pytest.raises(ValueError, match="eta"):
    G.guided_denoiser_batched(plain, "interleaved", eta=1.5)


def test_drop_conditioning_frequencies_and_exclusivity():
  p_text, p_neighbors, p_both = 0.1, 0.15, 0.05
  n = 200_000
  keep_text, keep_neighbors = C.drop_conditioning(jax.random.key(0), n, p_text, p_neighbors, p_both)
  assert keep_text.shape == keep_neighbors.shape == (n,) and keep_text.dtype == jnp.bool_
  kt, kn = np.asarray(keep_text), np.asarray(keep_neighbors)
  freqs = {"text_only": np.mean(~kt & kn), "neighbors_only": np.mean(kt & ~kn),
           "both": np.mean(~kt & ~kn), "none": np.mean(kt & kn)}
  expected = {"text_only": p_text, "neighbors_only": p_neighbors, "both": p_both,
              "none": 1 - p_text - p_neighbors - p_both}
  for key in freqs:  # binomial sd <= 0.0012 at n = 200k
    assert abs(freqs[key] - expected[key]) < 0.005, (key, freqs[key])


def test_drop_conditioning_edge_cases():
  kt, kn = C.drop_conditioning(jax.random.key(1), 1000, 0.0, 0.0, 0.0)
  assert bool(kt.all()) and bool(kn.all())
  kt, kn = C.drop_conditioning(jax.random.key(1), 1000, 0.0, 0.0, 1.0)
  assert not bool(kt.any()) and not bool(kn.any())
  kt, kn = jax.jit(C.drop_conditioning, static_argnums=1)(jax.random.key(2), 64, 0.5, 0.5, 0.0)
  assert not bool((~kt & ~kn).any())  # the two single drops never coincide
  for bad in [(-0.1, 0.0, 0.0), (0.5, 0.4, 0.2)]:
    with pytest.raises(ValueError, match="probabilities"):
      C.drop_conditioning(jax.random.key(0), 4, *bad)


def test_select_kept_and_mask_neighbors():
  keep = jnp.array([True, False, True])
  ids = jnp.arange(12).reshape(3, 4)
  null = jnp.full((1, 4), -1)
  np.testing.assert_array_equal(C.select_kept(keep, ids, null),
                                [[0, 1, 2, 3], [-1, -1, -1, -1], [8, 9, 10, 11]])
  mask = jnp.array([[True, True, False], [True, False, False], [True, True, True]])
  np.testing.assert_array_equal(C.mask_neighbors(mask, keep),
                                [[True, True, False], [False, False, False], [True, True, True]])
