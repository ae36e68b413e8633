"""Architecture of the LeFusion denoiser as a small dataclass, read from YAML (packaged names or files)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from nnunet_lefusion.errors import LeFusionError

if TYPE_CHECKING:
    from nnunet_lefusion.model.unet3d import Unet3D

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of ``Unet3D``; the defaults are the official cardiac (Emidec) network except ``dim``.

    ``linear_attn`` and ``temporal_attn`` say, per resolution level (finest first), whether the per-slice
    linear attention and the attention across slices are used there (in the down and the up path alike);
    ``None`` means everywhere, as in the official network. The attention across slices at the finest
    level also switches the initial one; the bottleneck always has both of its attentions. All attention
    modules are ``attn_heads`` x ``attn_dim_head`` wide (the official network: 8 x 32 everywhere).
    """

    dim: int
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 2
    out_channels: int | None = None
    cond_dim: int | None = 32
    attn_heads: int = 8
    attn_dim_head: int = 32
    linear_attn: tuple[bool, ...] | None = None
    temporal_attn: tuple[bool, ...] | None = None
    init_kernel_size: int = 7
    resnet_groups: int = 8

    def __post_init__(self) -> None:
        levels = len(self.dim_mults)
        object.__setattr__(self, "dim_mults", tuple(self.dim_mults))
        object.__setattr__(self, "out_channels", self.channels if self.out_channels is None else self.out_channels)
        for name in ("linear_attn", "temporal_attn"):
            flags = getattr(self, name)
            flags = (True,) * levels if flags is None else tuple(bool(f) for f in flags)
            if len(flags) != levels:
                raise LeFusionError(f"Model config '{name}' needs one flag per level ({levels}), got {len(flags)}.")
            object.__setattr__(self, name, flags)
        self._validate()

    def _validate(self) -> None:
        positive = {"dim": self.dim, "channels": self.channels, "out_channels": self.out_channels,
                    "attn_heads": self.attn_heads, "attn_dim_head": self.attn_dim_head,
                    "resnet_groups": self.resnet_groups, "init_kernel_size": self.init_kernel_size}
        if self.cond_dim is not None:
            positive["cond_dim"] = self.cond_dim
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LeFusionError(f"Model config '{name}' must be a positive integer, got {value!r}.")
        if not self.dim_mults or not all(isinstance(m, int) and m >= 1 for m in self.dim_mults):
            raise LeFusionError(f"Model config 'dim_mults' must be a non-empty list of positive integers, "
                                f"got {list(self.dim_mults)}.")
        if self.dim < 4 or self.dim % 2:
            raise LeFusionError(f"Model config 'dim' must be an even number >= 4, got {self.dim}.")
        if any(self.dim * m % self.resnet_groups for m in (1, *self.dim_mults)):
            raise LeFusionError(f"Every level width dim x mult must be divisible by resnet_groups "
                                f"({self.resnet_groups}); got dim {self.dim}, mults {list(self.dim_mults)}.")
        if self.attn_dim_head % 2:
            raise LeFusionError(f"Model config 'attn_dim_head' must be even (rotary pairs), got {self.attn_dim_head}.")
        if self.init_kernel_size % 2 == 0:
            raise LeFusionError(f"Model config 'init_kernel_size' must be odd, got {self.init_kernel_size}.")

    @property
    def level_dims(self) -> list[int]:
        """Channel widths of the resolution levels, finest first."""
        return [self.dim * m for m in self.dim_mults]

    @property
    def time_dim(self) -> int:
        """Width of the time embedding (4 x dim, as in the official network)."""
        return 4 * self.dim

    def to_dict(self) -> dict[str, Any]:
        """Plain python types only (lists, ints, bools, None): safe for YAML and ``weights_only`` loading."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a mapping such as ``to_dict()`` or a YAML file; unknown keys are an error."""
        if not isinstance(values, dict):
            raise LeFusionError(f"A model config must be a mapping of settings, got {type(values).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LeFusionError(f"Unknown model config key(s) {unknown}; known keys are {sorted(known)}.")
        if "dim" not in values:
            raise LeFusionError("A model config needs at least 'dim'.")
        try:
            return cls(**values)
        except TypeError as exc:
            raise LeFusionError(f"Invalid model config {values}: {exc}.") from None

    @classmethod
    def from_yaml(cls, path_or_name: str | Path) -> "ModelConfig":
        """Read a YAML file, or a packaged config by name (``tiny``, ``small``, ``official``)."""
        path = Path(path_or_name)
        if not path.suffix and not path.exists():
            path = CONFIG_DIR / f"{path_or_name}.yaml"
            if not path.is_file():
                raise LeFusionError(f"Unknown model config '{path_or_name}'; packaged configs are "
                                    f"{available_configs()}, or give a path to a YAML file.")
        try:
            values = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise LeFusionError(f"Cannot read model config {path}: {exc.strerror or exc}.") from None
        except UnicodeDecodeError:
            raise LeFusionError(f"Model config {path} is not a text (YAML) file.") from None
        except yaml.YAMLError as exc:
            raise LeFusionError(f"Model config {path} is not valid YAML ({exc.__class__.__name__}).") from None
        return cls.from_dict(values)

    def build(self) -> "Unet3D":
        """A freshly initialised denoiser with this architecture."""
        from nnunet_lefusion.model.unet3d import Unet3D

        return Unet3D(self)


def available_configs() -> list[str]:
    """Names of the packaged model configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
