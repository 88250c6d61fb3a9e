"""Evaluation: tokenizer metrics and the ablation grid."""
