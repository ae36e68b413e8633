"""Training of the diffusion networks: the generic loop and the LeFusion ROI data (no nnU-Net imports)."""
from nnunet_lefusion.training.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
