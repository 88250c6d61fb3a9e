"""Models: the tokenizer and the priors (the restructure moves the existing ones here)."""
