"""Generation: sampling the priors."""
