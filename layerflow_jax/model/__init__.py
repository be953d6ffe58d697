"""The LayerFlow DiT (Flax NNX) and its pieces."""

from layerflow_jax.model.dit import DiTConfig, LayerFlowDiT, abstract_model, count_params, create_model

__all__ = ["DiTConfig", "LayerFlowDiT", "abstract_model", "count_params", "create_model"]
