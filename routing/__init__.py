"""Per-token deciders that run inside a worker's engine step (R2R router, TaH decider, SpecEE exit)."""
