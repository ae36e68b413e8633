"""The LeFusion denoiser network, its model configs and checkpoint files (no nnU-Net imports)."""
from nnunet_lefusion.model.checkpoint import (Checkpoint, CheckpointMeta, export_checkpoint, infer_config,
                                              load_checkpoint, save_checkpoint)
from nnunet_lefusion.model.config import ModelConfig, available_configs
from nnunet_lefusion.model.unet3d import Unet3D

__all__ = [
    "Checkpoint",
    "CheckpointMeta",
    "ModelConfig",
    "Unet3D",
    "available_configs",
    "export_checkpoint",
    "infer_config",
    "load_checkpoint",
    "save_checkpoint",
]
