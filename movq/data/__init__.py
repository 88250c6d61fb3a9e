"""Data: the one way an image file becomes a tensor (``decode``), the shard format, image folders
and shards as per-rank streams, the built-in offline datasets, and token shards for the priors."""
