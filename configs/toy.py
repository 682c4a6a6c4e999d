"""Toy world at 16x16: a 2.8M-parameter pixel UNet (+0.1M text encoder) that trains on 2 CPU cores in minutes.

Base text-to-image model (no neighbors). The apprentice variant is `configs/toy_suti.py`.

  suti info --config configs/toy.py
  suti data toyweb --out /tmp/toyweb --pages 3000 --seed 0
  suti train --config configs/toy.py --workdir /tmp/toy_base --config.data.shards='/tmp/toyweb/*.tar'
  bash launch/local_cpu.sh                         # the same, scripted; DEVICES=8 / PROCESSES=2 simulate a pod

On 2 CPU cores the step runs at ~93 img/s (batch 32; benchmarks/train_throughput.py); the shipped
checkpoints/toy_base is this command's run (6,000 steps, 54 minutes on a shared 2-core machine).

Channels (32/64/96) and depth (one ResBlock per level) follow the toy calibration in the project's references;
attention (self + text cross-attention) sits at the 8x8 and 4x4 levels.
"""
import ml_collections as mlc


def get_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()

  c.model = mlc.ConfigDict()
  # A local diffusers Stable Diffusion folder to start from (configs/sd15.py): `suti train` converts it once into
  # <workdir>/pretrained and takes the model, text, vae and diffusion sections and the weights from it.
  c.model.pretrained = ""
  c.model.image_size = 16
  c.model.in_channels = 3
  c.model.out_channels = 3
  c.model.block_out_channels = (32, 64, 96)
  c.model.layers_per_block = 1
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  c.model.mid_block_type = "UNetMidBlock2DCrossAttn"
  c.model.num_attention_heads = 4
  c.model.cross_attention_dim = 64
  c.model.transformer_layers_per_block = 1
  c.model.norm_num_groups = 8
  c.model.norm_eps = 1e-5
  # ResBlock time conditioning: "scale_shift" (Imagen: norm2(h) * (1 + scale) + shift) or "default" (SD: added).
  c.model.resnet_time_scale_shift = "scale_shift"
  c.model.use_linear_projection = True
  c.model.flip_sin_to_cos = True
  c.model.freq_shift = 0
  c.model.text_in_time_embedding = True  # pooled text added to the time embedding (helps at toy scale)
  c.model.dtype = "float32"  # compute dtype; parameters stay float32
  # Neighbors (SuTI apprentice). num_neighbors = K_max; 0 means a plain text-to-image UNet.
  c.model.num_neighbors = 0
  c.model.neighbor_timestep = 0
  c.model.neighbor_token_resolutions = (4,)
  c.model.neighbor_attn_resolutions = (4,)

  c.text = mlc.ConfigDict()
  c.text.kind = "embedded"  # embedded | t5 | clip
  c.text.checkpoint = ""  # local Hugging Face folder for t5 / clip
  # Byte-level tokens: toy captions run to ~110 bytes and name the context last ("... on the beach"). At 32,
  # 56% of them were cut before the context and the trained base ignored the text (same loss for right and
  # wrong prompts); 128 keeps every caption whole.
  c.text.max_length = 128
  c.text.width = 64
  c.text.layers = 2
  c.text.heads = 4
  c.text.trainable = True

  # Latent models only (Stable Diffusion; the 32x32 latent toy): a frozen AutoencoderKL of diffusers' layout maps
  # images to the UNet's latents and back, and model.image_size is then the latent side. Off: a pixel model.
  c.vae = mlc.ConfigDict()
  c.vae.enabled = False
  c.vae.checkpoint = ""  # a diffusers vae/ folder whose weights the trainer loads (else train.init_from brings them)
  c.vae.block_out_channels = (64,)
  c.vae.layers_per_block = 1
  c.vae.in_channels = 3
  c.vae.out_channels = 3
  c.vae.latent_channels = 4
  c.vae.norm_num_groups = 32
  c.vae.sample_size = 32
  c.vae.scaling_factor = 0.18215  # latents = (mean - shift_factor) * scaling_factor
  c.vae.shift_factor = 0.0
  c.vae.use_quant_conv = True
  c.vae.use_post_quant_conv = True
  c.vae.mid_block_add_attention = True

  c.diffusion = mlc.ConfigDict()
  c.diffusion.schedule = "cosine"  # cosine | linear
  c.diffusion.num_timesteps = 1000
  c.diffusion.beta_start = 0.0001
  c.diffusion.beta_end = 0.02
  # How samplers walk the schedule (a diffusers scheduler config's terms): trailing | leading | linspace; an offset
  # added to leading timesteps; whether DDIM's last step lands on alpha = 1 (else on alphas_cumprod[0]).
  c.diffusion.timestep_spacing = "trailing"
  c.diffusion.steps_offset = 0
  c.diffusion.set_alpha_to_one = True
  # eps | v. v at toy scale: with eps and the cosine schedule, x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) blows up
  # near t = T (abar = 2e-4 at t = 990: x0 error 18 on a trained toy base), and 50-step DDIM without dynamic
  # thresholding returned saturated noise; the same run with v keeps clean backgrounds with or without it.
  c.diffusion.prediction = "v"
  c.diffusion.min_snr_gamma = 0.0  # 0 disables min-SNR weighting
  c.diffusion.p_drop_text = 0.1
  c.diffusion.p_drop_neighbors = 0.1
  c.diffusion.p_drop_both = 0.05

  c.sample = mlc.ConfigDict()
  c.sample.sampler = "ddim"  # ddpm | ddim | dpm++
  c.sample.steps = 50
  c.sample.text_scale = 3.0
  c.sample.neighbor_scale = 2.0
  c.sample.guidance_mode = "joint"  # joint | interleaved
  c.sample.interleave_eta = 0.5
  c.sample.dynamic_threshold = 0.995  # percentile; 0 disables (pixel models only)

  c.train = mlc.ConfigDict()
  c.train.steps = 6000
  c.train.batch_size = 32
  c.train.seed = 0
  c.train.optimizer = "adamw"  # adamw | adafactor (SuTI trained its apprentice and experts with Adafactor)
  c.train.lr = 5e-4
  c.train.lr_schedule = "cosine"  # cosine (to 0 at train.steps) | constant, both after a linear warmup
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.0
  c.train.clip_grad = True  # clip the global gradient norm to train.grad_clip
  c.train.grad_clip = 1.0
  c.train.grad_accum_steps = 1  # micro-batches per step: train.batch_size is split into this many
  c.train.ema_decay = 0.995  # 0 disables the EMA weights
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True
  c.train.sample_every = 500  # sample-grid PNG (EMA weights) every N steps; 0 disables
  c.train.num_samples = 8
  c.train.init_from = ""  # a base run's workdir or checkpoint: its weights initialise this model (apprentice)

  c.data = mlc.ConfigDict()
  c.data.shards = ""  # a path, glob, comma list or brace pattern of webdataset shards
  c.data.format = "auto"  # pairs (image-text) | icl (target + neighbors) | auto: icl when model.num_neighbors > 0
  c.data.shuffle_buffer = 1000
  c.data.prefetch = 2
  c.data.log_keys = False  # each process appends the sample keys of every step to <workdir>/input_keys.process<i>.jsonl

  # Device mesh: data parallel x FSDP; -1 takes the devices the other axis leaves. Batches split over both axes.
  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # Parameters with at least this many elements are sharded over `fsdp` along their largest divisible dimension.
  c.mesh.fsdp_min_size = 2**14
  # (regex over the parameter path, "fsdp" | "replicate"); the first match wins over the size rule.
  c.mesh.rules = (("norm", "replicate"),)
  return c
