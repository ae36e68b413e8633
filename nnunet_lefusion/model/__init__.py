"""The LeFusion denoiser network, its model configs and checkpoint files (no nnU-Net imports)."""
from nnunet_lefusion.model.config import ModelConfig, available_configs
from nnunet_lefusion.model.unet3d import Unet3D

__all__ = ["ModelConfig", "Unet3D", "available_configs"]
