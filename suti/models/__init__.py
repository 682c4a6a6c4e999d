"""Models: the UNet (diffusers UNet2DConditionModel layout) with SuTI neighbor layers, text encoders, LoRA,
and weight conversion. Import submodules directly for anything not re-exported here."""
from suti.models.neighbors import NeighborTokens, is_neighbor_param
from suti.models.unet import UNet, count_params, load_base_into_apprentice
from suti.models.unet_config import UNetConfig

__all__ = ["NeighborTokens", "UNet", "UNetConfig", "count_params", "is_neighbor_param", "load_base_into_apprentice"]
