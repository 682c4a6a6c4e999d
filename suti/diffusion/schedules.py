"""Noise schedules (variance preserving) and the algebra between x_t, x0, eps and v.

Forward process: x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alphas_cumprod[t]) and
sigma_t = sqrt(1 - alphas_cumprod[t]), so alpha_t^2 + sigma_t^2 = 1. The v target (Salimans & Ho 2022)
is v = alpha_t * eps - sigma_t * x0.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTIONS = ("eps", "v")
SCHEDULES = ("cosine", "linear", "scaled_linear")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
# The `diffusion` keys that say how samplers walk a schedule, with the values every config had before they
# existed (checkpoints written earlier read with these: suti.checkpoint.store.checkpoint_config).
SAMPLING_DEFAULTS = {"timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True}


def check_prediction(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def broadcast_like(coef: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example coefficient [B] (or a scalar) so it broadcasts against x [B, ...]."""
  coef = jnp.asarray(coef)
  if coef.ndim == 0:
    return coef
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


@flax.struct.dataclass
class Schedule:
  """A discrete diffusion schedule; a pytree, so it can be passed through jax.jit.

  The last three fields say how samplers walk it, as a diffusers scheduler config does (a converted model
  samples as diffusers samples it): `timestep_spacing` (trailing | leading | linspace), `steps_offset` (added to
  leading sampling timesteps: SD's 1) and `set_alpha_to_one` (DDIM's last step lands on alpha = 1, clean data;
  False: on alphas_cumprod[0], as SD's DDIM config says).
  """
  betas: jax.Array  # [T] float32
  alphas_cumprod: jax.Array  # [T] float32, strictly decreasing
  num_timesteps: int = flax.struct.field(pytree_node=False)
  timestep_spacing: str = flax.struct.field(pytree_node=False, default="trailing")
  steps_offset: int = flax.struct.field(pytree_node=False, default=0)
  set_alpha_to_one: bool = flax.struct.field(pytree_node=False, default=True)

  def alpha(self, t: jax.Array) -> jax.Array:
    """Signal scale sqrt(alphas_cumprod[t]); same shape as t."""
    return jnp.sqrt(self.alphas_cumprod[t])

  def sigma(self, t: jax.Array) -> jax.Array:
    """Noise scale sqrt(1 - alphas_cumprod[t]); same shape as t."""
    return jnp.sqrt(1.0 - self.alphas_cumprod[t])

  def snr(self, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2."""
    acp = self.alphas_cumprod[t]
    return acp / (1.0 - acp)

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draws x_t ~ q(x_t | x0) given the noise: alpha_t * x0 + sigma_t * noise (t is [B])."""
    return broadcast_like(self.alpha(t), x0) * x0 + broadcast_like(self.sigma(t), x0) * noise

  def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
    """The regression target of the model for this prediction type."""
    check_prediction(prediction)
    if prediction == "eps":
      return noise
    return v_from_x0_eps(x0, noise, broadcast_like(self.alpha(t), x0), broadcast_like(self.sigma(t), x0))

  def x0_eps(self, x_t: jax.Array, t: jax.Array, output: jax.Array,
             prediction: str) -> tuple[jax.Array, jax.Array]:
    """Model output at (x_t, t) -> (predicted x0, predicted eps)."""
    return output_to_x0_eps(x_t, output, broadcast_like(self.alpha(t), x_t),
                            broadcast_like(self.sigma(t), x_t), prediction)


# Conversions. alpha and sigma broadcast against x (use broadcast_like for per-example values).

def x0_from_eps(x_t: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: jax.Array, x0: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return alpha * eps - sigma * x0


def x0_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return alpha * x_t - sigma * v  # uses alpha^2 + sigma^2 = 1


def eps_from_v(x_t: jax.Array, v: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  return sigma * x_t + alpha * v  # uses alpha^2 + sigma^2 = 1


def output_to_x0_eps(x_t: jax.Array, output: jax.Array, alpha: jax.Array, sigma: jax.Array,
                     prediction: str) -> tuple[jax.Array, jax.Array]:
  """Model output (eps or v) -> (x0, eps)."""
  check_prediction(prediction)
  if prediction == "eps":
    return x0_from_eps(x_t, output, alpha, sigma), output
  return x0_from_v(x_t, output, alpha, sigma), eps_from_v(x_t, output, alpha, sigma)


# Schedules. Computed in float64 on the host, stored as float32.

def _from_betas(betas: np.ndarray) -> Schedule:
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.size < 2:
    raise ValueError(f"a schedule needs at least 2 timesteps, got {betas.size}")
  if np.any(betas <= 0) or np.any(betas >= 1):
    raise ValueError("betas must lie in (0, 1)")
  acp = np.cumprod(1.0 - betas)
  return Schedule(betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(acp, jnp.float32),
                  num_timesteps=int(betas.size))


def linear_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                    scaled: bool = False) -> Schedule:
  """DDPM's linear betas; scaled=True is Stable Diffusion's "scaled_linear" (linear in sqrt(beta))."""
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
  if not 0 < beta_start <= beta_end < 1:
    raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
  if scaled:
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps) ** 2
  else:
    betas = np.linspace(beta_start, beta_end, num_timesteps)
  return _from_betas(betas)


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal's continuous alpha_bar(u), u = t / T in [0, 1] (normalised to alpha_bar(0) = 1)."""
  f = lambda v: np.cos((v + s) / (1.0 + s) * np.pi / 2) ** 2
  return f(np.asarray(u, np.float64)) / f(0.0)


def cosine_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """Cosine schedule: alphas_cumprod[i] = alpha_bar((i + 1) / T), betas clipped at max_beta."""
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
  grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = cosine_alpha_bar(grid, s)
  betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
  return _from_betas(betas)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  if hasattr(cfg, "get"):  # ml_collections.ConfigDict
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def make_schedule(cfg: Any) -> Schedule:
  """Builds the schedule of a `diffusion` config: schedule (cosine | linear | scaled_linear),
  num_timesteps, beta_start, beta_end (linear kinds only), and how samplers walk it: timestep_spacing,
  steps_offset, set_alpha_to_one (defaults trailing, 0, True; configs written before these keys get them)."""
  kind = _get(cfg, "schedule")
  num_timesteps = _get(cfg, "num_timesteps")
  if num_timesteps is None:
    raise ValueError("diffusion.num_timesteps is missing")
  if kind == "cosine":
    schedule = cosine_schedule(int(num_timesteps))
  elif kind in ("linear", "scaled_linear"):
    schedule = linear_schedule(int(num_timesteps), float(_get(cfg, "beta_start", 1e-4)),
                               float(_get(cfg, "beta_end", 0.02)), scaled=kind == "scaled_linear")
  else:
    raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {kind!r}")
  spacing = _get(cfg, "timestep_spacing", SAMPLING_DEFAULTS["timestep_spacing"])
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f"diffusion.timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
  offset = _get(cfg, "steps_offset", SAMPLING_DEFAULTS["steps_offset"])
  if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool) or offset < 0:
    raise ValueError(f"diffusion.steps_offset must be an integer >= 0, got {offset!r}")
  to_one = _get(cfg, "set_alpha_to_one", SAMPLING_DEFAULTS["set_alpha_to_one"])
  if not isinstance(to_one, (bool, np.bool_)):
    raise ValueError(f"diffusion.set_alpha_to_one must be True or False, got {to_one!r}")
  return schedule.replace(timestep_spacing=spacing, steps_offset=int(offset), set_alpha_to_one=bool(to_one))
