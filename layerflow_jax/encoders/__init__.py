"""Pretrained encoders in Flax NNX that import PyTorch checkpoints: the T5-v1.1 text encoder (:mod:`.t5`) and
CogVideoX's 3D causal VAE (:mod:`.vae`).

Both are frozen in LayerFlow. Their NNX attribute names mirror the PyTorch module names (``encoder.block.0.layer.0
.SelfAttention.q``, ``decoder.up_blocks.1.resnets.2.conv1.conv``), so one importer (:mod:`.weights`) maps any
transformers / diffusers state dict onto them and names every missing, unexpected or mis-shaped tensor.
``layerflow_jax.text.make_text_encoder`` and ``layerflow_jax.codec.make_codec`` build them from a config
(``text_encoder.kind = "t5"``, ``autoencoder.kind = "cogvideox"``).
"""
