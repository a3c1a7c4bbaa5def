"""Cache-to-cache fusion: KV fusers (projector + gate), token alignment, training, co-located serving.

`c2c.fuser` (the fuser and layer mapping), `c2c.align` (token alignment), `c2c.checkpoint` (safetensors +
JSON naming the model pair), `c2c.train` (`tandem c2c train`), `c2c.colocated` (C2C and T2T on one engine)."""
