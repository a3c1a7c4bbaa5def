"""Cache-to-cache fusion: KV fusers (projector + gate) and their training."""
