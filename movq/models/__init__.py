"""The networks: MoVQ (encoder, multichannel quantizer, SpatialNorm decoder), the PatchGAN
discriminator and the MaskGIT prior; each model folder loads with ``from_pretrained``."""
