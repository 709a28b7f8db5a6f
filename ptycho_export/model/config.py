"""Everything needed to rebuild a model, as plain JSON-able data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ARCHITECTURES = ("cnn", "backprop-unet")

# name -> (architecture, widths). "cnn" is PtychoPINN's shape (encoder to k-space features,
# two decoders); "backprop-unet" starts from the back-propagated estimate
# (ptycho_export.model.backprop). The default is chosen from bench/results/quality-*.md.
PRESETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "default": ("backprop-unet", (16, 32, 64)),
    # PtychoPINN's default for N=64 (n_filters_scale 2): about 2.3 M parameters.
    "pinn": ("cnn", (64, 128, 256)),
    # The small CNN: trains in minutes on 2 cores.
    "small": ("cnn", (16, 32, 64)),
    # Unit tests.
    "tiny": ("cnn", (4, 8, 16)),
    "unet-tiny": ("backprop-unet", (4, 8, 16)),
}


@dataclass(frozen=True)
class ModelConfig:
    patch_size: int = 64
    gridsize: int = 1
    widths: tuple[int, ...] = field(default_factory=lambda: PRESETS["pinn"][1])
    # Amplitude head is amp_max * sigmoid: non-negative and bounded.
    amp_max: float = 2.0
    architecture: str = "cnn"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of "
                             f"{', '.join(ARCHITECTURES)}")
        # the U-Net pools between its levels only; the CNN after every one
        levels = len(self.widths) - (self.architecture == "backprop-unet")
        stride = 2 ** levels
        if self.patch_size % stride:
            raise ValueError(
                f"patch size {self.patch_size} must be divisible by {stride} "
                f"({levels} pooling stages)"
            )
        if self.gridsize not in (1, 2):
            raise ValueError(f"gridsize must be 1 or 2, got {self.gridsize}")

    @property
    def channels(self) -> int:
        """Patterns per sample: 1 for gridsize 1, 4 neighbours for gridsize 2."""
        return self.gridsize * self.gridsize

    def to_dict(self) -> dict:
        values = asdict(self)
        values["widths"] = list(self.widths)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {"patch_size", "gridsize", "widths", "amp_max"}  # architecture: cnn if absent
        missing = known - set(values)
        if missing:
            raise KeyError(f"model config is missing {sorted(missing)}")
        def integer(key: str, value: object) -> int:
            # int(32.7) == 32 and int(True) == 1 would build some other model silently
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"model {key} is {value!r}; expected an integer")
            return value

        widths = values["widths"]
        if not isinstance(widths, list | tuple):
            raise ValueError(f"model widths is {widths!r}; expected a list of integers")
        amp_max = values["amp_max"]
        if isinstance(amp_max, bool) or not isinstance(amp_max, int | float) \
                or not math.isfinite(amp_max) or amp_max <= 0:
            raise ValueError(f"model amp_max is {amp_max!r}; expected a finite number > 0")
        architecture = values.get("architecture", "cnn")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"model architecture is {architecture!r}; expected one of "
                             f"{', '.join(ARCHITECTURES)}")
        return cls(
            architecture=architecture,
            patch_size=integer("patch_size", values["patch_size"]),
            gridsize=integer("gridsize", values["gridsize"]),
            widths=tuple(integer("widths", w) for w in widths),
            amp_max=float(amp_max),
        )

    @classmethod
    def from_preset(cls, preset: str, patch_size: int, gridsize: int = 1) -> ModelConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        architecture, widths = PRESETS[preset]
        return cls(patch_size=patch_size, gridsize=gridsize, widths=widths,
                   architecture=architecture)
