from ptycho_export.model.config import PRESETS, ModelConfig
from ptycho_export.model.generator import Generator, PtychoNet, count_parameters

__all__ = ["PRESETS", "Generator", "ModelConfig", "PtychoNet", "count_parameters"]
