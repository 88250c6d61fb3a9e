"""movq: MoVQ image tokenizers (Zheng et al., NeurIPS 2022) and their MaskGIT prior (Chang et al., CVPR 2022)."""
from movq.config import ConfigError, MaskGITConfig, TokenizerConfig, load_config
from movq.models.autoencoder import MoVQ
from movq.models.maskgit import MaskGIT
from movq.models.quantizer import MultichannelQuantizer

__version__ = "0.1.0"
__all__ = ["MoVQ", "TokenizerConfig", "load_config", "ConfigError", "MultichannelQuantizer", "MaskGIT", "MaskGITConfig"]
