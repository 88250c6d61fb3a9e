"""Training: the loop both trainers share, checkpoints and guards, the tokenizer loss, and the
tokenizer and prior trainers."""
