"""Diffusion machinery, independent of the network: schedules, training loss, samplers,
classifier-free guidance, conditioning dropout and x0 thresholding.

A model enters only as a function: `fn(x_t, t) -> output` for the loss, and
`denoise_fn(x_t, t, step_rng) -> output` for the samplers (output is eps or v).
"""
from suti.diffusion.conditioning import drop_conditioning, mask_neighbors, select_kept
from suti.diffusion.guidance import (GUIDANCE_MODES, guided_denoiser, guided_denoiser_batched,
                                     joint_weights, make_guided_denoiser)
from suti.diffusion.losses import (diffusion_loss, min_snr_weights, per_example_mse, sample_timesteps,
                                   training_targets, weighted_mse)
from suti.diffusion.samplers import (SAMPLERS, SPACINGS, ddim_sample, ddpm_sample, dpmpp_2m_sample,
                                     ignore_rng, sample, sampling_timesteps)
from suti.diffusion.schedules import (PREDICTIONS, SCHEDULES, Schedule, broadcast_like, cosine_alpha_bar,
                                      cosine_schedule, eps_from_v, eps_from_x0, linear_schedule,
                                      make_schedule, output_to_x0_eps, v_from_x0_eps, x0_from_eps,
                                      x0_from_v)
from suti.diffusion.thresholding import dynamic_threshold, make_x0_fn, static_clip

__all__ = [
    "GUIDANCE_MODES", "PREDICTIONS", "SAMPLERS", "SCHEDULES", "SPACINGS", "Schedule", "broadcast_like",
    "cosine_alpha_bar", "cosine_schedule", "ddim_sample", "ddpm_sample", "diffusion_loss",
    "dpmpp_2m_sample", "drop_conditioning", "dynamic_threshold", "eps_from_v", "eps_from_x0",
    "guided_denoiser", "guided_denoiser_batched", "ignore_rng", "joint_weights", "linear_schedule",
    "make_guided_denoiser", "make_schedule", "make_x0_fn", "mask_neighbors", "min_snr_weights",
    "output_to_x0_eps", "per_example_mse", "sample", "sample_timesteps", "sampling_timesteps",
    "select_kept", "static_clip", "training_targets", "v_from_x0_eps", "weighted_mse", "x0_from_eps",
    "x0_from_v",
]
