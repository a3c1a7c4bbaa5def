"""Cache-to-cache fusion: KV fusers (projector + gate), token alignment, training, co-located serving.

`c2c.fuser` (the fuser and layer mapping), `c2c.align` (token alignment), `c2c.checkpoint` (safetensors +
JSON naming the model pair), `c2c.train` (`tandem c2c train`), `c2c.colocated` (C2C on one engine), `c2c.t2t` (its text baseline), `c2c.stepping` (what they share)."""
