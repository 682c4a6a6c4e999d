"""Samplers over a subset of the training timesteps: DDPM (ancestral), DDIM (eta) and DPM-Solver++(2M).

A denoiser is `denoise_fn(x_t, t [B] int32, step_rng) -> model output` (eps or v per `prediction`);
the step rng feeds stochastic guidance (Re-Imagen's interleaving) and may be ignored.

Timestep spacing (`sampling_timesteps`), for T training steps and n sampling steps, descending:
  "trailing" (default): round(T - i*T/n) - 1, starts at the noisiest timestep T-1 (Lin et al. 2024,
             "Common diffusion noise schedules and sample steps are flawed"), ends at about T/n - 1;
  "leading": i * (T // n), as in DDIM / Stable Diffusion, starts below T-1 and ends at 0;
  "linspace": round(linspace(0, T-1, n));
"leading" ones are shifted by the schedule's `steps_offset` (SD: 1, so 901, 801, ..., 1 for 10 steps), as
diffusers does. DPM-Solver++ spaces leading and linspace timesteps as diffusers' DPMSolverMultistepScheduler does
(n + 1 points, the last dropped: leading 910, 819, ..., 91 + offset for 10 steps), so with the same config it
visits the same timesteps and lands on the same sample (first order at the first and last steps, as there). Every sampler then takes a last step from its final timestep to clean data (alpha = 1,
sigma = 0), so `steps` equals the number of denoiser calls; DDIM on a schedule with set_alpha_to_one False lands
on alphas_cumprod[0] instead, as diffusers' DDIMScheduler does. `spacing=None` (the samplers' default) takes the
schedule's `timestep_spacing`. Unlike diffusers' DDIM, which always steps back by T // n, each step here goes to
the next timestep of the list (the same for leading and trailing spacing; for linspace it is not).

By default the loop is a `jax.lax.fori_loop`, so the whole sampler traces once under `jax.jit`
(`steps`, `prediction` and `spacing` are static). With `progress=True` it instead runs a host
loop with a tqdm bar: the denoiser is called eagerly (pass a jitted one) and the update is jitted.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from suti.diffusion.schedules import (TIMESTEP_SPACINGS, Schedule, check_prediction, eps_from_x0,
                                      output_to_x0_eps)

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
X0Fn = Callable[[jax.Array], jax.Array]
SPACINGS = TIMESTEP_SPACINGS
SAMPLERS = ("ddpm", "ddim", "dpm++")


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing", offset: int = 0, *,
                       multistep: bool = False) -> np.ndarray:
  """The n descending, distinct timesteps a sampler visits (see the module docstring); `offset` shifts the
  leading ones only, as diffusers' schedulers apply `steps_offset`. multistep: the spacing of diffusers'
  DPMSolverMultistepScheduler, whose leading and linspace timesteps are n + 1 points with the last (0) dropped."""
  if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_timesteps:
    raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
  if spacing == "trailing":
    ts = np.round(num_timesteps - np.arange(steps) * (num_timesteps / steps)) - 1
  elif spacing == "leading" and multistep:
    ts = np.round(np.arange(steps + 1) * (num_timesteps // (steps + 1)))[::-1][:-1]
  elif spacing == "leading":
    ts = (np.arange(steps) * (num_timesteps // steps))[::-1]
  elif spacing == "linspace" and multistep:
    ts = np.round(np.linspace(0, num_timesteps - 1, steps + 1))[::-1][:-1]
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, num_timesteps - 1, steps))[::-1]
  else:
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
  ts = ts.astype(np.int32) + (int(offset) if spacing == "leading" else 0)
  if ts[0] >= num_timesteps:
    raise ValueError(f"steps_offset {offset} puts the first of {steps} {spacing} timesteps at {ts[0]}, past the "
                     f"schedule's last timestep {num_timesteps - 1}")
  assert np.all(np.diff(ts) < 0) and ts[-1] >= 0 and ts[0] < num_timesteps, ts
  return ts


def ignore_rng(model_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Denoiser:
  """Adapts a deterministic `fn(x_t, t)` to the denoiser signature."""
  return lambda x_t, t, step_rng: model_fn(x_t, t)


class _Plan:
  """Per-step schedule values: alphas_cumprod at the current step and at the next one (`final` at the end: 1,
  or alphas_cumprod[0] for DDIM on a schedule with set_alpha_to_one False)."""

  def __init__(self, schedule: Schedule, steps: int, spacing: str | None, *, follow_alpha_to_one: bool = False,
               multistep: bool = False):
    spacing = schedule.timestep_spacing if spacing is None else spacing
    self.timesteps = sampling_timesteps(schedule.num_timesteps, steps, spacing, schedule.steps_offset,
                                        multistep=multistep)
    self.steps = steps
    self.acp = schedule.alphas_cumprod[self.timesteps]
    final = (schedule.alphas_cumprod[:1] if follow_alpha_to_one and not schedule.set_alpha_to_one
             else jnp.ones((1,), self.acp.dtype))
    self.acp_next = jnp.concatenate([self.acp[1:], final])


def _x0_eps(x: jax.Array, output: jax.Array, acp: jax.Array, prediction: str,
            x0_fn: X0Fn | None) -> tuple[jax.Array, jax.Array]:
  """Model output -> (x0, eps); after thresholding x0, eps is re-derived so the pair stays consistent."""
  alpha, sigma = jnp.sqrt(acp), jnp.sqrt(1.0 - acp)
  x0, eps = output_to_x0_eps(x, output.astype(x.dtype), alpha, sigma, prediction)
  if x0_fn is not None:
    x0 = x0_fn(x0)
    eps = eps_from_x0(x, x0, alpha, sigma)
  return x0, eps


def _step_rngs(rng: jax.Array, i: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(rng for the denoiser, rng for the sampler's own noise) of step i."""
  model_rng, noise_rng = jax.random.split(jax.random.fold_in(rng, i))
  return model_rng, noise_rng


def _run(denoise_fn: Denoiser, update: Callable[[jax.Array, Any, jax.Array], Any], carry: Any,
         plan: _Plan, rng: jax.Array, progress: bool, desc: str) -> Any:
  """Runs `update(i, carry, model_output)` for every step; carry[0] is the current x."""
  timesteps = jnp.asarray(plan.timesteps)

  def body(i, carry):
    x = carry[0]
    t = jnp.full((x.shape[0],), timesteps[i], jnp.int32)
    return update(i, carry, denoise_fn(x, t, _step_rngs(rng, i)[0]))

  if not progress:
    return jax.lax.fori_loop(0, plan.steps, body, carry)
  jitted_update = jax.jit(update)
  for i in tqdm(range(plan.steps), desc=desc, unit="step"):
    x = carry[0]
    t = jnp.full((x.shape[0],), int(plan.timesteps[i]), jnp.int32)
    carry = jitted_update(jnp.int32(i), carry, denoise_fn(x, t, _step_rngs(rng, jnp.int32(i))[0]))
  return carry


def ddim_sample(denoise_fn: Denoiser, x_T: jax.Array, rng: jax.Array, schedule: Schedule,
                steps: int = 50, *, prediction: str = "eps", eta: float = 0.0,
                x0_fn: X0Fn | None = None, spacing: str | None = None,
                progress: bool = False) -> jax.Array:
  """DDIM (Song et al. 2021): eta = 0 is the deterministic probability-flow discretisation,
  eta = 1 draws from the DDPM posterior q(x_s | x_t, x0_pred)."""
  check_prediction(prediction)
  plan = _Plan(schedule, steps, spacing, follow_alpha_to_one=True)

  def update(i, carry, output):
    (x,) = carry
    acp, acp_next = plan.acp[i], plan.acp_next[i]
    x0, eps = _x0_eps(x, output, acp, prediction, x0_fn)
    noise_std = eta * jnp.sqrt((1.0 - acp_next) / (1.0 - acp) * (1.0 - acp / acp_next))
    eps_scale = jnp.sqrt(jnp.maximum(1.0 - acp_next - noise_std**2, 0.0))
    z = jax.random.normal(_step_rngs(rng, i)[1], x.shape, x.dtype)
    return ((jnp.sqrt(acp_next) * x0 + eps_scale * eps + noise_std * z).astype(x.dtype),)

  return _run(denoise_fn, update, (x_T,), plan, rng, progress, "ddim")[0]


def ddpm_sample(denoise_fn: Denoiser, x_T: jax.Array, rng: jax.Array, schedule: Schedule,
                steps: int | None = None, *, prediction: str = "eps", x0_fn: X0Fn | None = None,
                spacing: str | None = None, progress: bool = False) -> jax.Array:
  """Ancestral sampling (Ho et al. 2020) from the posterior q(x_s | x_t, x0_pred) with its own
  variance ("fixed small"); over a subset of timesteps the betas are those between visited steps.
  steps=None walks all T timesteps."""
  check_prediction(prediction)
  plan = _Plan(schedule, schedule.num_timesteps if steps is None else steps, spacing)

  def update(i, carry, output):
    (x,) = carry
    acp, acp_next = plan.acp[i], plan.acp_next[i]
    x0, _ = _x0_eps(x, output, acp, prediction, x0_fn)
    alpha_step = acp / acp_next
    beta_step = 1.0 - alpha_step
    mean = (jnp.sqrt(acp_next) * beta_step / (1.0 - acp)) * x0 + (
        jnp.sqrt(alpha_step) * (1.0 - acp_next) / (1.0 - acp)) * x
    std = jnp.sqrt((1.0 - acp_next) / (1.0 - acp) * beta_step)
    z = jax.random.normal(_step_rngs(rng, i)[1], x.shape, x.dtype)
    return ((mean + std * z).astype(x.dtype),)

  return _run(denoise_fn, update, (x_T,), plan, rng, progress, "ddpm")[0]


def dpmpp_2m_sample(denoise_fn: Denoiser, x_T: jax.Array, rng: jax.Array, schedule: Schedule,
                    steps: int = 20, *, prediction: str = "eps", x0_fn: X0Fn | None = None,
                    spacing: str | None = None, progress: bool = False) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in the data prediction x0, in
  lambda = log(alpha / sigma). With h_i = lambda_{i+1} - lambda_i and r = h_{i-1} / h_i:
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}   (D = x0_i at the first step)
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} * expm1(-h_i) * D.
  The last step (to sigma = 0, lambda = inf) is first order and returns x0 of the final call."""
  check_prediction(prediction)
  plan = _Plan(schedule, steps, spacing, multistep=True)
  lam = 0.5 * (jnp.log(plan.acp) - jnp.log1p(-plan.acp))
  # lambda of the next step; the clean endpoint gets a finite stand-in (its result is replaced).
  lam_next = jnp.concatenate([lam[1:], lam[-1:] + 1.0])

  def update(i, carry, output):
    x, x0_prev, h_prev = carry
    acp, acp_next = plan.acp[i], plan.acp_next[i]
    x0, _ = _x0_eps(x, output, acp, prediction, x0_fn)
    h = lam_next[i] - lam[i]
    r = h_prev / h
    c = jnp.where(i == 0, 0.0, 0.5 / jnp.where(i == 0, 1.0, r))  # weight of the backward difference
    d = (1.0 + c) * x0 - c * x0_prev
    x_next = jnp.sqrt((1.0 - acp_next) / (1.0 - acp)) * x - jnp.sqrt(acp_next) * jnp.expm1(-h) * d
    x_next = jnp.where(i == plan.steps - 1, x0, x_next)
    return x_next.astype(x.dtype), x0.astype(x.dtype), h.astype(jnp.float32)

  carry = (x_T, jnp.zeros_like(x_T), jnp.ones((), jnp.float32))
  return _run(denoise_fn, update, carry, plan, rng, progress, "dpm++")[0]


def sample(denoise_fn: Denoiser, x_T: jax.Array, rng: jax.Array, schedule: Schedule, steps: int,
           *, sampler: str = "ddim", prediction: str = "eps", x0_fn: X0Fn | None = None,
           spacing: str | None = None, eta: float = 0.0, progress: bool = False) -> jax.Array:
  """Dispatches on the sampler name ("ddpm" | "ddim" | "dpm++"); eta is DDIM's only."""
  common = dict(prediction=prediction, x0_fn=x0_fn, spacing=spacing, progress=progress)
  if sampler == "ddim":
    return ddim_sample(denoise_fn, x_T, rng, schedule, steps, eta=eta, **common)
  if sampler == "ddpm":
    return ddpm_sample(denoise_fn, x_T, rng, schedule, steps, **common)
  if sampler in ("dpm++", "dpmpp_2m"):
    return dpmpp_2m_sample(denoise_fn, x_T, rng, schedule, steps, **common)
  raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
