"""Generation with the priors: the MaskGIT parallel decode (also inpainting / outpainting) and
what turns sampled tokens into images. Imports nothing from training."""
