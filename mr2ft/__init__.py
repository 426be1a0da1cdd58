"""mr2ft: fine-tune pretrained vision backbones with MR2 and report per-class results."""

__version__ = "0.1.0"
