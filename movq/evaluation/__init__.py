"""Evaluation: LPIPS, the FID Inception network, FID statistics, tokenizer metrics and pictures."""
