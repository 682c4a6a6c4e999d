"""An Imagen-like 64x64 pixel base model conditioned on T5 v1.1 text, the scale SuTI's apprentice starts from.

Smaller than Imagen's 2B base (channels 256..1024, two ResBlocks per level); attention at 32, 16 and 8.

  suti info --config configs/imagen64.py
  # a TPU v4-128 pod (64 chips: mesh 8 x 8), the same command on every worker, the bucket mounted with gcsfuse:
  TPU_NAME=my-v4-128 ZONE=us-central2-b CONFIG=configs/imagen64.py WORKDIR=/mnt/my-bucket/runs/imagen64 \
  DATA='gs://my-bucket/pairs/{00000..01023}.tar' bash launch/tpu_pod.sh \
      --config.text.checkpoint=/models/t5-v1_1-xl --config.model.dtype=bfloat16

Parameters and Adam moments are sharded 8-way over `fsdp`, the batch over all 64 chips (launch/README.md).
"""
import ml_collections as mlc

from configs import toy


def get_config() -> mlc.ConfigDict:
  c = toy.get_config()
  m = c.model
  m.image_size = 64
  m.block_out_channels = (256, 512, 768, 1024)
  m.layers_per_block = 2
  m.down_block_types = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
  m.up_block_types = ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)
  m.num_attention_heads = 8
  m.cross_attention_dim = 2048
  m.norm_num_groups = 32
  m.resnet_time_scale_shift = "scale_shift"  # as Imagen's ResBlocks
  m.neighbor_token_resolutions = (8,)
  m.neighbor_attn_resolutions = (8, 16)

  c.text.kind = "t5"
  c.text.checkpoint = ""  # e.g. /models/t5-v1_1-xl (local Hugging Face folder)
  c.text.max_length = 128
  c.text.width = 2048
  c.text.trainable = False

  c.diffusion.schedule = "cosine"
  c.sample.text_scale = 5.0
  c.train.batch_size = 2048
  c.train.lr = 1e-4
  c.train.ema_decay = 0.9999
  c.mesh.data = -1
  c.mesh.fsdp = 8
  c.diffusion.prediction = "eps"  # Imagen's 64x64 base predicts eps (with dynamic thresholding)
  return c
