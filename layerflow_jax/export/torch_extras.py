"""PyTorch side of an export: LayerFlow's extras on a diffusers ``CogVideoXTransformer3DModel``.

Only PyTorch users import this module (nothing in training does), so torch is needed only here. It attaches
what diffusers' model has no place for, exactly as our DiT computes it:

* the layer embedding ``LayerNorm(Linear(1 → D)(i))`` of prompt ``i`` added to every token of that prompt after
  the text projection (``layer_embed`` ``text`` / ``text+video``);
* a learned vector per sub-clip added to that clip's video tokens (``text+video``);
* the learned position table (``pos_embed`` ``learned``, the official SAT models): its text rows on the text
  tokens, its first video rows on the video tokens, in place of diffusers' sin-cos table (switched off on the
  transformer by ``attach``), and the final adaLN norm's eps (``final_norm_eps``, 1e-6 there).

Both are added to the output of ``transformer.patch_embed`` through a forward hook, i.e. after diffusers'
text projection and sin-cos table (zeros on text tokens) — the same sums in the same order as ours — so
anything that calls the transformer (our wrapper, ``CogVideoXPipeline``, a hand-written loop) gets them.

Usage::

  model = LayerFlowTransformer.from_export("out/export")            # base + extras + inference LoRAs
  v = model(latents_bfchw, text_embeds, timesteps)                   # RoPE computed as ours when needed

or, on a transformer you already have: ``LayerFlowExtras.from_file(".../layerflow_extras.safetensors")
.attach(transformer)``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

EXTRAS_NAME = "layerflow_extras.safetensors"
EXTRAS_METADATA_KEY = "layerflow"


def read_info(path: str | pathlib.Path) -> dict:
  """The JSON metadata of an extras file (a file or the export folder holding it)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / EXTRAS_NAME
  with safe_open(str(path), framework="pt") as f:
    meta = f.metadata() or {}
  if EXTRAS_METADATA_KEY not in meta:
    raise ValueError(f"{path}: no {EXTRAS_METADATA_KEY!r} metadata (not a LayerFlow extras file)")
  return json.loads(meta[EXTRAS_METADATA_KEY])


class LayerFlowExtras(torch.nn.Module):
  """Layer embedder and clip embeddings of an export, as a hook on ``transformer.patch_embed``."""

  def __init__(self, info: dict):
    super().__init__()
    self.info = dict(info)
    self.layer_embed = info["layer_embed"]
    self.num_prompts = int(info["num_prompts"])
    self.num_clips = int(info["num_clips"])
    d = int(info["hidden"])
    if self.layer_embed not in ("none", "text", "text+video"):
      raise ValueError(f"layer_embed {self.layer_embed!r} unknown")
    if self.layer_embed != "none":
      self.layer_embed_linear = torch.nn.Linear(1, d)
      self.layer_embed_norm = torch.nn.LayerNorm(d, eps=float(info["norm_eps"]))
    if self.layer_embed == "text+video":
      self.clip_embed = torch.nn.Parameter(torch.zeros(self.num_clips, d))
    self.learned_table = info.get("pos_embed") == "learned"
    if self.learned_table:
      self.pos_text_tokens = int(info["pos_text_tokens"])
      self.pos_embedding = torch.nn.Parameter(torch.zeros(int(info["pos_table_rows"]), d))
    self.final_norm_eps = float(info.get("final_norm_eps") or 0.0)

  @classmethod
  def from_file(cls, path: str | pathlib.Path) -> "LayerFlowExtras":
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / EXTRAS_NAME
    module = cls(read_info(path))
    sd = load_file(str(path))
    state = {
      k.replace("layer_embed.linear.", "layer_embed_linear.")
      .replace("layer_embed.norm.", "layer_embed_norm.")
      .replace("clip_embed.weight", "clip_embed")
      .replace("pos_embedding.weight", "pos_embedding"): v
      for k, v in sd.items()
    }
    module.load_state_dict(
      state, strict=True
    )  # kept float32 (exact for bfloat16 files); sums cast to the input dtype
    return module

  def given_clips(self, task: str) -> list[bool]:
    """Which sub-clips the task gives (kept clean at every step), in layout order."""
    tasks = self.info["tasks"]
    if task not in tasks:
      raise ValueError(f"task {task!r} unknown; expected one of {sorted(tasks)}")
    return [c in tasks[task] for c in self.info["clips"]]

  def prompt_embedding(self, dtype: torch.dtype) -> torch.Tensor:
    """[num_prompts, D]: ``LayerNorm(Linear(i))`` (the norm's statistics in float32, as ours)."""
    w = self.layer_embed_linear.weight
    index = torch.arange(self.num_prompts, dtype=torch.float32, device=w.device)[:, None]
    h = self.layer_embed_linear(index.to(w.dtype))
    n = self.layer_embed_norm
    h = torch.nn.functional.layer_norm(h.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
    return h.to(dtype)

  def add(self, embeds: torch.Tensor, num_text: int) -> torch.Tensor:
    """``patch_embed`` output [B, T + N, D] → with the layer / clip embeddings (and a learned table) added."""
    b, total, d = embeds.shape
    table = None
    if self.learned_table:
      if num_text != self.pos_text_tokens or total - num_text > self.pos_embedding.shape[0] - num_text:
        raise ValueError(
          f"{num_text} text + {total - num_text} video tokens do not fit the learned table "
          f"({self.pos_text_tokens} text rows of {self.pos_embedding.shape[0]})"
        )
      table = self.pos_embedding.to(embeds.dtype)[:total][None]
    if self.layer_embed == "none":
      return embeds if table is None else embeds + table
    if num_text % self.num_prompts:
      raise ValueError(f"{num_text} text tokens cannot be split into {self.num_prompts} prompts")
    text = embeds[:, :num_text].reshape(b, self.num_prompts, num_text // self.num_prompts, d)
    text = (text + self.prompt_embedding(embeds.dtype)[None, :, None]).reshape(b, num_text, d)
    video = embeds[:, num_text:]
    if self.layer_embed == "text+video":
      n = total - num_text
      if n % self.num_clips:
        raise ValueError(f"{n} video tokens cannot be split into {self.num_clips} sub-clips")
      video = video + self.clip_embed.to(embeds.dtype).repeat_interleave(n // self.num_clips, dim=0)[None]
    out = torch.cat([text, video], dim=1)
    return out if table is None else out + table

  def attach(self, transformer) -> torch.utils.hooks.RemovableHandle:
    """Hooks ``transformer.patch_embed`` (``handle.remove()`` detaches); the transformer's state dict is unchanged.

    With a learned table the transformer's own sin-cos table is switched off, and ``final_norm_eps`` is set on
    ``norm_out.norm`` (both stay so after ``remove()``)."""
    if self.learned_table:
      transformer.patch_embed.use_positional_embeddings = False
      transformer.patch_embed.use_learned_positional_embeddings = False
    if self.final_norm_eps:
      transformer.norm_out.norm.eps = self.final_norm_eps

    def hook(module, args, output):
      return self.add(output, args[0].shape[1])

    return transformer.patch_embed.register_forward_hook(hook)


def rotary_embedding(transformer, frames: int, height: int, width: int, device=None):
  """3D RoPE (cos, sin) over the latent grid as our DiT builds it (no crop / resize), or None for sin-cos models."""
  conf = transformer.config
  if not conf.use_rotary_positional_embeddings:
    return None
  from diffusers.models.embeddings import get_3d_rotary_pos_embed  # LayerFlowExtras alone needs no diffusers

  p = conf.patch_size
  gh, gw = height // p, width // p
  return get_3d_rotary_pos_embed(
    embed_dim=conf.attention_head_dim,
    crops_coords=((0, 0), (gh, gw)),
    grid_size=(gh, gw),
    temporal_size=frames,
    device=device,
  )


class LayerFlowTransformer(torch.nn.Module):
  """A diffusers transformer with the extras attached; ``forward`` takes diffusers' layout [B, F, C, H, W]."""

  def __init__(self, transformer, extras: LayerFlowExtras):
    super().__init__()
    self.transformer = transformer
    self.extras = extras
    self._handle = extras.attach(transformer)

  @property
  def config(self):
    return self.transformer.config

  @property
  def info(self) -> dict:
    return self.extras.info

  @classmethod
  def from_export(
    cls,
    folder: str | pathlib.Path,
    *,
    adapters: str | Sequence[str] = "inference",
    torch_dtype: torch.dtype | None = None,
  ) -> "LayerFlowTransformer":
    """Loads an export: the transformer, the extras, and LoRA adapters through diffusers' ``load_lora_adapter``.

    ``adapters``: ``"inference"`` (the adapters sampling keeps, at their sampling scale; the default),
    ``"all"`` (every exported adapter, scale 1 unless its sampling scale says otherwise), or a list of names.
    """
    from diffusers import CogVideoXTransformer3DModel  # pyright: ignore[reportPrivateImportUsage]  # as above

    folder = pathlib.Path(folder)
    transformer = CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=torch_dtype)
    extras = LayerFlowExtras.from_file(folder / EXTRAS_NAME)
    model = cls(transformer.eval(), extras.eval())
    files = {a["name"]: a for a in extras.info["adapters"] if a["file"]}
    if adapters == "inference":
      names = [n for n, a in files.items() if a["inference"]]
    elif adapters == "all":
      names = list(files)
    else:
      names = list(adapters)
      unknown = [n for n in names if n not in files]
      if unknown:
        raise ValueError(f"adapters {unknown} are not exported as files; exported: {sorted(files)}")
    for name in names:
      model.load_adapter(folder / files[name]["file"], name)
    if names:
      transformer.set_adapters(names, weights=[files[n]["scale"] for n in names])
    return model

  def load_adapter(self, path: str | pathlib.Path, name: str) -> None:
    """One PEFT LoRA file through diffusers' ``load_lora_adapter`` (alpha / r from the file's metadata)."""
    path = pathlib.Path(path)
    self.transformer.load_lora_adapter(
      str(path.parent), weight_name=path.name, adapter_name=name, prefix="transformer"
    )

  def forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timestep,
    image_rotary_emb: Any = None,
    **kwargs,
  ) -> torch.Tensor:
    """Velocity [B, F, C, H, W] (diffusers' ``return_dict=False`` output, unwrapped)."""
    _, f, _, h, w = hidden_states.shape
    if image_rotary_emb is None:
      image_rotary_emb = rotary_embedding(self.transformer, f, h, w, device=hidden_states.device)
    return self.transformer(
      hidden_states=hidden_states,
      encoder_hidden_states=encoder_hidden_states,
      timestep=timestep,
      image_rotary_emb=image_rotary_emb,
      return_dict=False,
      **kwargs,
    )[0]
