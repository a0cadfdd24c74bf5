"""ε-networks. Only this package and ``checkpoint`` know network internals."""
from .unet import PRESETS, UNet, UNetConfig, preset_config

__all__ = ["PRESETS", "UNet", "UNetConfig", "preset_config"]
