from nnunet_lefusion.nnunet.trainer import *  # noqa: F401,F403 (nnunet-lefusion trainer stub)
