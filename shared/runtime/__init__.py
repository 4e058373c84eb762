"""A service's life: the Redis stream bus, service lifecycle and health, the model worker loop,
request ownership, and the numerics (dtype, MoE backend) every rank of a deployment agrees on."""
