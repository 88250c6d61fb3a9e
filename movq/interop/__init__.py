"""Other codebases' checkpoints in (diffusers, MoVQGAN, taming), read without running pickled code."""
