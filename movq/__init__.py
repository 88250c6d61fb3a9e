"""movq: MoVQ image tokenizers (Zheng et al., NeurIPS 2022) and their MaskGIT prior (Chang et al., CVPR 2022)."""
from movq.autoencoder import MoVQ
from movq.config import ConfigError, TokenizerConfig, load_config
from movq.maskgit import MaskGIT, MaskGITConfig
from movq.quantizer import MultichannelQuantizer

__version__ = "0.1.0"
__all__ = ["MoVQ", "TokenizerConfig", "load_config", "ConfigError", "MultichannelQuantizer", "MaskGIT", "MaskGITConfig"]
