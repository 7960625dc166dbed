"""The models floor: the Wan2.1 DiT (dit.py), the text encoders (umT5 in umt5.py, the toy byte encoder in text.py),
the decoders (the Wan VAE in vae.py, TAEHV in taehv.py, the toy world's codec in toy.py), and weight loading
(checkpoint.py: tensor by tensor into meta-device models; wan_checkpoints.py: Wan's original, diffusers' and
Self-Forcing's layouts). Imports `sfpp.engine` and `sfpp.kernels`."""
