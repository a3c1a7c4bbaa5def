"""A worker process: the engine step loop over one or more resident models."""
