"""PyTorch / diffusers interop.

* :mod:`.diffusers_weights` — state-dict conversion of the DiT (NumPy, parity-tested);
* :mod:`.diffusers_folder` — diffusers folders on disk (config.json, safetensors shards + index);
* :mod:`.peft_lora` — our adapters as PEFT ``pytorch_lora_weights.safetensors`` files;
* :mod:`.convert` — ``import_diffusers`` (folder → checkpoint work dir) and ``export_*`` (→ folder + LoRA + extras);
* :mod:`.commands` — ``layerflow import-diffusers`` / ``layerflow export``;
* :mod:`.torch_extras` — the PyTorch module attaching LayerFlow's extras to a diffusers model (imports torch).

Only ``torch_extras`` needs torch; nothing here is imported by training.
"""
