"""Ray actors: thin wrappers that hold a model and run :mod:`segflow` on shards."""
