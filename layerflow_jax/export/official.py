"""``layerflow import-official``: the eight official LayerFlow SAT checkpoints → a project checkpoint work dir.

Source: a variant folder ``<variant>/latest`` + ``<variant>/<iteration>/mp_rank_00_model_states.pt`` (or the
``.pt`` itself), a SwissArmyTransformer pickle whose ``["module"]`` holds the network under
``model.diffusion_model.`` (other prefixes — T5, VAE — are ignored). Facts: ``../shared/LAYERFLOW_OFFICIAL.md``.

The five network layouts are told apart by keys and shapes: the layer embedder (``txt_embedder``, RGBA gen and
fg2bg/bg2fg) and the row count of the position table ``text (2 or 3 × 226) + latent frames (16, 17 or 13) ×
tokens per frame``. Within a layout the variants share one network (fg2bg_rgba / bg2fg_rgba; gen / fg2bg / bg2fg
RGB): ``--variant``, a variant name in the source path, or for RGB a never-trained table (zero text rows, the
sin-cos video rows: gen_rgb) picks the task.

Mapping onto the project model (each part exact, see the fact sheet's part 2):

* the base network through the diffusers names (q/k/v = the row thirds of ``query_key_value``, the 12 adaLN
  chunks → ``norm1`` 0,1,2,6,7,8 and ``norm2`` 3,4,5,9,10,11 …), loaded by ``from_diffusers_state_dict``;
* the stored position table (text rows included) as ``pos_embed="learned"`` — for every variant, since even the
  fixed sin-cos table is loaded from the file by the official code (bf16-rounded in a bf16 file);
* the layer embedder ``txt_embedder.{0,1}`` → ``layer_embed_{linear,norm}``; final adaLN norm eps 1e-6;
* ``matrix_A/B`` (q, k, v, dense) → adapter ``motion`` (rank 8), ``matrix_C/D`` → adapter ``content`` (rank 256,
  not switchable), both alpha 1 (multiplier 1/r), on the blocks where B / D are non-zero plus the trained blocks
  5, 11, 17, 23, 29 (an adapter's other blocks hold B = 0, so leaving them out is exact).

Tensors keep their stored dtype (a bf16 file gives a bf16 model, float32 LayerNorms holding the same values).
torch is needed only to read the pickle (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Mapping

import jax
import ml_collections as mlc
import ml_dtypes
import numpy as np
from flax import nnx

from configs import common
from layerflow_jax.export import convert
from layerflow_jax.export import diffusers_weights as dw
from layerflow_jax.model import dit
from layerflow_jax.model import embeddings as emb
from layerflow_jax.train import checkpoint as ckpt_lib
from layerflow_jax.train import partition
from layerflow_jax.train.experiment import Experiment

PREFIX = "model.diffusion_model."
TEXT_TOKENS_PER_PROMPT = 226  # hard-coded in the official code
CHECKPOINT_NAME = "mp_rank_00_model_states.pt"
TRAINED_EVERY = 6  # stage-2 trained blocks: index % 6 == 5


class OfficialImportError(ValueError):
  """A source that is not an official LayerFlow checkpoint this importer fits (one line: what and where)."""


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  layout: str  # "rgba" | "rgb"
  task: str
  num_prompts: int
  table_frames: int  # latent frames of the position table
  lead_frames: int
  layer_embed: bool
  learned_table: bool  # learnable_pos_embed (the table was trained, text rows included)
  given_latent_frames: tuple[int, ...] = ()  # packed latent frames the task gives, when not whole clips

  @property
  def network(self) -> str:
    return NETWORKS[(self.layer_embed, self.num_prompts, self.table_frames)]


VARIANTS = {
  v.name: v
  for v in (
    Variant("gen_rgba", "rgba", "generate", 3, 16, 0, True, False),
    Variant("seg_rgba", "rgba", "decompose", 2, 16, 0, False, True),
    Variant("fg2bg_rgba", "rgba", "fg2bg", 3, 17, 1, True, False),
    Variant("bg2fg_rgba", "rgba", "bg2fg", 3, 17, 1, True, False),
    Variant("gen_rgb", "rgb", "generate", 3, 13, 0, False, False),
    Variant("seg_rgb", "rgb", "decompose", 2, 13, 0, False, True, given_latent_frames=(10, 11)),
    Variant("fg2bg_rgb", "rgb", "fg2bg", 3, 13, 0, False, True),
    Variant("bg2fg_rgb", "rgb", "bg2fg", 3, 13, 0, False, True),
  )
}
# The five distinct networks: (layer embedder, prompts, table frames) → a name.
NETWORKS = {
  (True, 3, 16): "gen RGBA",
  (False, 2, 16): "seg RGBA",
  (True, 3, 17): "fg2bg/bg2fg RGBA (17 frames)",
  (False, 3, 13): "gen/fg2bg/bg2fg RGB",
  (False, 2, 13): "seg RGB",
}


# ----------------------------------------------------------------------------- reading


def checkpoint_file(src: str | pathlib.Path) -> pathlib.Path:
  """The ``.pt`` of a variant folder (through its ``latest``) or ``src`` itself when it is a file."""
  src = pathlib.Path(src)
  if src.is_file():
    return src
  if not src.is_dir():
    raise OfficialImportError(
      f"{src}: no such file or folder (expected a variant folder with latest and "
      f"<iteration>/{CHECKPOINT_NAME}, or the .pt file)"
    )
  latest = src / "latest"
  if not latest.is_file():
    raise OfficialImportError(
      f"{latest}: missing (a SAT checkpoint folder names its iteration there, e.g. 1000)"
    )
  iteration = latest.read_text().strip()
  if not iteration:
    raise OfficialImportError(f"{latest}: empty (expected the iteration, e.g. 1000)")
  path = src / iteration / CHECKPOINT_NAME
  if not path.is_file():
    raise OfficialImportError(f"{path}: missing ({latest} names iteration {iteration!r})")
  return path


def _to_numpy(t) -> np.ndarray:
  import torch  # optional (the torch extra): reading the official pickle

  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def read_network(path: pathlib.Path) -> tuple[dict[str, np.ndarray], int]:
  """(network tensors by name after ``model.diffusion_model.``, number of other keys ignored)."""
  try:
    import torch  # optional (the torch extra), refused in one line below
  except ImportError:
    raise OfficialImportError(
      "reading an official .pt needs PyTorch: pip install 'layerflow-jax[torch]'"
    ) from None
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # truncated zip, not a pickle, a pickle with objects weights_only refuses …
    first = (str(e).strip().splitlines() or [""])[0][:160]
    raise OfficialImportError(
      f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})"
    ) from None
  sd = obj.get("module", obj) if isinstance(obj, Mapping) else None
  if not isinstance(sd, Mapping):
    raise OfficialImportError(
      f"{path}: expected a dict with the state dict under 'module', got {type(obj).__name__}"
    )
  net, ignored = {}, 0
  for k, v in sd.items():
    if not isinstance(k, str) or not k.startswith(PREFIX):
      ignored += 1
      continue
    if not isinstance(v, torch.Tensor):
      raise OfficialImportError(f"{path}: {k} is a {type(v).__name__}, expected a tensor")
    net[k[len(PREFIX) :]] = _to_numpy(v)
  if not net:
    raise OfficialImportError(
      f"{path}: no key starts with {PREFIX!r} (expected the network of a SAT LayerFlow "
      f"checkpoint, e.g. {PREFIX}mixins.patch_embed.proj.weight [1920, 16, 2, 2])"
    )
  return net, ignored


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Dims:
  hidden: int
  num_layers: int
  head_dim: int
  time_embed_dim: int
  in_channels: int
  out_channels: int
  patch_size: int
  text_dim: int
  mlp: int
  motion_rank: int
  content_rank: int

  @property
  def num_heads(self) -> int:
    return self.hidden // self.head_dim


def _need(net: Mapping[str, np.ndarray], key: str, shape_doc: str, ndim: int) -> tuple[int, ...]:
  if key not in net:
    raise OfficialImportError(f"{PREFIX}{key}: missing (expected shape {shape_doc})")
  shape = tuple(net[key].shape)
  if len(shape) != ndim:
    raise OfficialImportError(f"{PREFIX}{key}: shape {list(shape)}, expected {shape_doc}")
  return shape


def read_dims(net: Mapping[str, np.ndarray]) -> Dims:
  d, c, p, p2 = _need(net, "mixins.patch_embed.proj.weight", "[hidden, 16, 2, 2]", 4)
  _, text_dim = _need(net, "mixins.patch_embed.text_proj.weight", f"[{d}, 4096]", 2)
  temb, _ = _need(net, "time_embed.0.weight", f"[512, {d}]", 2)
  (head_dim,) = _need(net, "mixins.adaln_layer.query_layernorm_list.0.weight", "[64]", 1)
  mlp, _ = _need(net, "transformer.layers.0.mlp.dense_h_to_4h.weight", f"[{4 * d}, {d}]", 2)
  out, _ = _need(net, "mixins.final_layer.linear.weight", f"[{p * p2 * c}, {d}]", 2)
  rm, _ = _need(net, "transformer.layers.0.attention.query_key_value.matrix_A.0", f"[8, {d}]", 2)
  rc, _ = _need(net, "transformer.layers.0.attention.query_key_value.matrix_C.0", f"[256, {d}]", 2)
  layers = {int(m.group(1)) for k in net for m in [re.match(r"transformer\.layers\.(\d+)\.", k)] if m}
  n = max(layers) + 1
  if p != p2 or d % head_dim or out % (p * p) or mlp % d:
    raise OfficialImportError(
      f"{PREFIX}mixins.patch_embed.proj.weight {[d, c, p, p2]} / head dim {head_dim} / "
      f"final linear {out} / mlp {mlp}: no CogVideoX network has these sizes"
    )
  return Dims(
    hidden=d,
    num_layers=n,
    head_dim=head_dim,
    time_embed_dim=temb,
    in_channels=c,
    out_channels=out // (p * p),
    patch_size=p,
    text_dim=text_dim,
    mlp=mlp,
    motion_rank=rm,
    content_rank=rc,
  )


def expected_shapes(dims: Dims, layer_embed: bool, table_rows: int) -> dict[str, tuple[int, ...]]:
  """Every network key (after the prefix) of a layout and its shape."""
  d, t, p = dims.hidden, dims.time_embed_dim, dims.patch_size
  out = {
    "time_embed.0.weight": (t, d),
    "time_embed.0.bias": (t,),
    "time_embed.2.weight": (t, t),
    "time_embed.2.bias": (t,),
    "mixins.patch_embed.proj.weight": (d, dims.in_channels, p, p),
    "mixins.patch_embed.proj.bias": (d,),
    "mixins.patch_embed.text_proj.weight": (d, dims.text_dim),
    "mixins.patch_embed.text_proj.bias": (d,),
    "mixins.pos_embed.pos_embedding": (1, table_rows, d),
    "transformer.final_layernorm.weight": (d,),
    "transformer.final_layernorm.bias": (d,),
    "mixins.final_layer.norm_final.weight": (d,),
    "mixins.final_layer.norm_final.bias": (d,),
    "mixins.final_layer.linear.weight": (p * p * dims.out_channels, d),
    "mixins.final_layer.linear.bias": (p * p * dims.out_channels,),
    "mixins.final_layer.adaLN_modulation.1.weight": (2 * d, t),
    "mixins.final_layer.adaLN_modulation.1.bias": (2 * d,),
  }
  if layer_embed:
    out.update(
      {
        "mixins.pos_embed.txt_embedder.0.weight": (d, 1),
        "mixins.pos_embed.txt_embedder.0.bias": (d,),
        "mixins.pos_embed.txt_embedder.1.weight": (d,),
        "mixins.pos_embed.txt_embedder.1.bias": (d,),
      }
    )
  rm, rc, hd = dims.motion_rank, dims.content_rank, dims.head_dim
  for n in range(dims.num_layers):
    a, tl = "mixins.adaln_layer.", f"transformer.layers.{n}."
    out.update(
      {
        f"{a}adaLN_modulations.{n}.1.weight": (12 * d, t),
        f"{a}adaLN_modulations.{n}.1.bias": (12 * d,),
        f"{a}query_layernorm_list.{n}.weight": (hd,),
        f"{a}query_layernorm_list.{n}.bias": (hd,),
        f"{a}key_layernorm_list.{n}.weight": (hd,),
        f"{a}key_layernorm_list.{n}.bias": (hd,),
        f"{tl}input_layernorm.weight": (d,),
        f"{tl}input_layernorm.bias": (d,),
        f"{tl}post_attention_layernorm.weight": (d,),
        f"{tl}post_attention_layernorm.bias": (d,),
        f"{tl}attention.query_key_value.original.weight": (3 * d, d),
        f"{tl}attention.query_key_value.original.bias": (3 * d,),
        f"{tl}attention.dense.original.weight": (d, d),
        f"{tl}attention.dense.original.bias": (d,),
        f"{tl}mlp.dense_h_to_4h.weight": (dims.mlp, d),
        f"{tl}mlp.dense_h_to_4h.bias": (dims.mlp,),
        f"{tl}mlp.dense_4h_to_h.weight": (d, dims.mlp),
        f"{tl}mlp.dense_4h_to_h.bias": (d,),
      }
    )
    for proj, parts in (("query_key_value", 3), ("dense", 1)):
      for i in range(parts):
        base = f"{tl}attention.{proj}."
        out.update(
          {
            f"{base}matrix_A.{i}": (rm, d),
            f"{base}matrix_B.{i}": (d, rm),
            f"{base}matrix_C.{i}": (rc, d),
            f"{base}matrix_D.{i}": (d, rc),
          }
        )
  return out


def _plain_aliases(net: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A plain ``…query_key_value.weight`` / ``…dense.weight`` (a CogVideoX base file) is the LoRA ``original``."""
  out = {}
  for k, v in net.items():
    m = re.match(r"(transformer\.layers\.\d+\.attention\.(?:query_key_value|dense))\.(weight|bias)$", k)
    out[f"{m.group(1)}.original.{m.group(2)}" if m else k] = v
  return out


def _check(net: Mapping[str, np.ndarray], want: Mapping[str, tuple[int, ...]], what: str) -> None:
  for k in sorted(want):
    if k not in net:
      raise OfficialImportError(f"{PREFIX}{k}: missing (expected shape {list(want[k])}; {what})")
  for k in sorted(want):
    if tuple(net[k].shape) != tuple(want[k]):
      raise OfficialImportError(f"{PREFIX}{k}: shape {list(net[k].shape)}, expected {list(want[k])} ({what})")
  unknown = sorted(set(net) - set(want))
  if unknown:
    raise OfficialImportError(
      f"{PREFIX}{unknown[0]}: unknown key ({len(unknown)} unknown; {what} has none such)"
    )


def _grids(tokens: int) -> list[tuple[int, int]]:
  return [(a, tokens // a) for a in range(1, tokens + 1) if tokens % a == 0]


def _sincos_grid(table: np.ndarray, text: int, frames: int, hidden: int) -> tuple[int, int] | None:
  """The (rows, cols) token grid whose 3D sin-cos table the video rows hold (a never-trained table), or None."""
  tokens = (table.shape[0] - text) // frames
  if tokens < 1 or np.any(np.asarray(table[:text], np.float32) != 0):
    return None
  grids = sorted(_grids(tokens), key=lambda g: g != (30, 45))  # the released grid first
  for rows, cols in grids:  # the first two frames decide (temporal positions 0 and 1)
    n = min(frames, 2)
    ref = emb.sincos_3d(hidden, n, rows, cols, 1.875, 1.0)
    if np.max(np.abs(ref - np.asarray(table[text : text + n * tokens], np.float32))) <= 1e-2:  # bf16: < 4e-3
      return rows, cols
  return None


@dataclasses.dataclass
class Detected:
  variant: Variant
  dims: Dims
  grid: tuple[int, int]  # latent token rows, cols (the size of data.height/width ÷ 8 ÷ patch)
  reasons: list[str]


def detect(net: dict[str, np.ndarray], src: str | pathlib.Path, variant: str | None = None) -> Detected:
  """The variant of a network (or checks the one named), the sizes, and which keys decided."""
  if variant is not None and variant not in VARIANTS:
    raise OfficialImportError(f"--variant {variant!r} unknown; expected one of {', '.join(VARIANTS)}")
  dims = read_dims(net)
  embed_key = "mixins.pos_embed.txt_embedder.0.weight"
  has_embed = embed_key in net
  (_, rows, width) = _need(
    net, "mixins.pos_embed.pos_embedding", f"[1, text + frames·tokens, {dims.hidden}]", 3
  )
  table = net["mixins.pos_embed.pos_embedding"][0]
  reasons = [
    f"{PREFIX}{embed_key} {'present' if has_embed else 'absent'} (layer embedding "
    f"{'on' if has_embed else 'off'})"
  ]
  fits = []
  for (embed, prompts, frames), network in NETWORKS.items():
    text = prompts * TEXT_TOKENS_PER_PROMPT
    if embed != has_embed or rows <= text or (rows - text) % frames:
      continue
    fits.append(((embed, prompts, frames), network, text, (rows - text) // frames))
  named = VARIANTS[variant] if variant else None
  if named is not None:
    fits = [f for f in fits if f[0] == (named.layer_embed, named.num_prompts, named.table_frames)]
  if not fits:
    want = (named.num_prompts * TEXT_TOKENS_PER_PROMPT, named.table_frames) if named else None
    shape = (
      f"[1, {want[0]} + {want[1]}·tokens, {dims.hidden}]"
      if want
      else "[1, 678 + 16 or 17 × tokens per frame, D] with txt_embedder, [1, 452 + 16 or 13 × tokens, D] or "
      "[1, 678 + 13 × tokens, D] without"
    )
    raise OfficialImportError(
      f"{PREFIX}mixins.pos_embed.pos_embedding: shape [1, {rows}, {width}] fits no "
      f"{'layout of ' + variant if variant else 'official layout'} (expected {shape})"
    )
  if len(fits) > 1:  # a never-trained table tells its frames; else the released 30 × 45 token grid
    sincos = [f for f in fits if _sincos_grid(table, f[2], f[0][2], dims.hidden)]
    released = [f for f in fits if f[3] == 1350]
    fits = sincos if len(sincos) == 1 else released if len(released) == 1 else fits
  if len(fits) > 1:
    raise OfficialImportError(
      f"{PREFIX}mixins.pos_embed.pos_embedding: [1, {rows}, {width}] fits the layouts "
      f"{' and '.join(f[1] for f in fits)}; name one with --variant"
    )
  (embed, prompts, frames), network, text, tokens = fits[0]
  reasons.append(
    f"{PREFIX}mixins.pos_embed.pos_embedding [1, {rows}, {width}] = {prompts} prompts × "
    f"{TEXT_TOKENS_PER_PROMPT} text rows + {frames} latent frames × {tokens} tokens"
  )
  candidates = [v for v in VARIANTS.values() if v.network == network]
  grid = _sincos_grid(table, text, frames, dims.hidden)
  if named is not None:
    chosen = named
    reasons.append(f"--variant {named.name}")
  else:
    hint = [v for v in candidates if v.name in str(pathlib.Path(src).absolute())]
    hint = [max(hint, key=lambda v: len(v.name))] if hint else []
    if hint:
      chosen = hint[0]
      reasons.append(f"the source path names {chosen.name}")
    elif len(candidates) == 1:
      chosen = candidates[0]
    else:
      fixed = [v for v in candidates if not v.learned_table]
      learned = [v for v in candidates if v.learned_table]
      if fixed and learned:
        chosen = fixed[0] if grid else learned[0]
        reasons.append(
          f"position table {'never trained (zero text rows, sin-cos video rows)' if grid else 'trained'}"
          f" → {chosen.name}"
        )
      else:
        chosen = candidates[0]
      others = [v.name for v in candidates if v is not chosen and v.learned_table == chosen.learned_table]
      if others:
        reasons.append(
          f"{chosen.name} assumed: {', '.join(others)} has the same network (pass --variant for it)"
        )
  if grid is None:
    grid = (30, 45) if tokens == 1350 else min(_grids(tokens), key=lambda g: (abs(g[1] / g[0] - 1.5), g[0]))
    reasons.append(
      f"token grid {grid[0]}×{grid[1]} (chosen for data.height/width; the network takes any grid "
      f"of {tokens} tokens)"
    )
  else:
    reasons.append(f"token grid {grid[0]}×{grid[1]} read from the sin-cos table")
  want = expected_shapes(dims, embed, rows)
  _check(net, want, f"the {network} layout")
  return Detected(chosen, dims, grid, reasons)


# ----------------------------------------------------------------------------- conversion


def _lora_blocks(net: Mapping[str, np.ndarray], n: int, up: str) -> list[int]:
  nonzero = [
    i
    for i in range(n)
    for k in (f"transformer.layers.{i}.attention.query_key_value.{up}.{j}" for j in range(3))
    if np.any(np.asarray(net[k], np.float32) != 0)
  ]
  nonzero += [
    i
    for i in range(n)
    if np.any(np.asarray(net[f"transformer.layers.{i}.attention.dense.{up}.0"], np.float32) != 0)
  ]
  blocks = sorted(set(nonzero) | {i for i in range(n) if i % TRAINED_EVERY == TRAINED_EVERY - 1})
  return blocks or list(range(n))


def to_diffusers(net: Mapping[str, np.ndarray], dims: Dims) -> dict[str, np.ndarray]:
  """The base network under ``CogVideoXTransformer3DModel`` names (PyTorch layouts, stored dtypes)."""
  d = dims.hidden
  sd = {}

  def lin(ours, theirs):
    sd[f"{ours}.weight"], sd[f"{ours}.bias"] = net[f"{theirs}.weight"], net[f"{theirs}.bias"]

  lin("time_embedding.linear_1", "time_embed.0")
  lin("time_embedding.linear_2", "time_embed.2")
  lin("patch_embed.proj", "mixins.patch_embed.proj")
  lin("patch_embed.text_proj", "mixins.patch_embed.text_proj")
  lin("norm_final", "transformer.final_layernorm")
  lin("norm_out.norm", "mixins.final_layer.norm_final")
  lin("norm_out.linear", "mixins.final_layer.adaLN_modulation.1")
  lin("proj_out", "mixins.final_layer.linear")
  for n in range(dims.num_layers):
    b, tl = f"transformer_blocks.{n}.", f"transformer.layers.{n}."
    for kind in ("weight", "bias"):
      mod = net[f"mixins.adaln_layer.adaLN_modulations.{n}.1.{kind}"]
      chunks = np.split(mod, 12, axis=0)
      sd[f"{b}norm1.linear.{kind}"] = np.concatenate([chunks[i] for i in (0, 1, 2, 6, 7, 8)], axis=0)
      sd[f"{b}norm2.linear.{kind}"] = np.concatenate([chunks[i] for i in (3, 4, 5, 9, 10, 11)], axis=0)
      qkv = net[f"{tl}attention.query_key_value.original.{kind}"]
      for i, name in enumerate(("to_q", "to_k", "to_v")):
        sd[f"{b}attn1.{name}.{kind}"] = qkv[i * d : (i + 1) * d]
    lin(f"{b}attn1.norm_q", f"mixins.adaln_layer.query_layernorm_list.{n}")
    lin(f"{b}attn1.norm_k", f"mixins.adaln_layer.key_layernorm_list.{n}")
    lin(f"{b}norm1.norm", f"{tl}input_layernorm")
    lin(f"{b}norm2.norm", f"{tl}post_attention_layernorm")
    lin(f"{b}attn1.to_out.0", f"{tl}attention.dense.original")
    lin(f"{b}ff.net.0.proj", f"{tl}mlp.dense_h_to_4h")
    lin(f"{b}ff.net.2", f"{tl}mlp.dense_4h_to_h")
  return sd


def to_extras(
  net: Mapping[str, np.ndarray],
  dims: Dims,
  adapters: Mapping[str, tuple[str, str, list[int]]],
  layer_embed: bool,
) -> dict[str, np.ndarray]:
  """Layer embedder, learned table and adapters in the project's extras names (see ``extras_state_dict``)."""
  out = {"pos_embedding.weight": net["mixins.pos_embed.pos_embedding"][0]}
  if layer_embed:
    for i, part in ((0, "linear"), (1, "norm")):
      for kind in ("weight", "bias"):
        out[f"layer_embed.{part}.{kind}"] = net[f"mixins.pos_embed.txt_embedder.{i}.{kind}"]
  modules = (
    ("query_key_value", 0, "attn1.to_q"),
    ("query_key_value", 1, "attn1.to_k"),
    ("query_key_value", 2, "attn1.to_v"),
    ("dense", 0, "attn1.to_out.0"),
  )
  for name, (down, up, blocks) in adapters.items():
    for n in blocks:
      for proj, i, module in modules:
        base = f"transformer.layers.{n}.attention.{proj}"
        out[f"adapters.{name}.transformer_blocks.{n}.{module}.lora_A.weight"] = net[f"{base}.{down}.{i}"]
        out[f"adapters.{name}.transformer_blocks.{n}.{module}.lora_B.weight"] = net[f"{base}.{up}.{i}"]
  return out


def _all_bf16(net: Mapping[str, np.ndarray]) -> bool:
  return all(str(v.dtype) == "bfloat16" for v in net.values())


def make_config(
  base: mlc.ConfigDict,
  det: Detected,
  net: Mapping[str, np.ndarray],
  adapters: Mapping[str, tuple[str, str, list[int]]],
  pipeline: str = "",
) -> mlc.ConfigDict:
  """``base`` with the variant's model, layout, task and sampling (a copy)."""
  v, dims = det.variant, det.dims
  config = mlc.ConfigDict(base.to_dict())
  config.layout = v.layout
  m = config.model
  m.update(
    num_layers=dims.num_layers,
    num_heads=dims.num_heads,
    head_dim=dims.head_dim,
    time_embed_dim=dims.time_embed_dim,
    patch_size=dims.patch_size,
    mlp_ratio=dims.mlp // dims.hidden,
    norm_eps=1e-5,
    qk_norm_eps=1e-6,
    pos_embed="learned",
    pos_table_frames=v.table_frames,
    lead_frames=v.lead_frames,
    num_prompts=v.num_prompts,
    layer_embed="text" if v.layer_embed else "none",
    final_norm_eps=1e-6,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    clip_positions="video",
    given_embed=False,
    param_dtype="bfloat16" if _all_bf16(net) else "float32",
  )
  sizes = common.MODEL_SIZES
  m.size = next(
    (name for name, s in sizes.items() if all(m.get(k) == val for k, val in s.items() if k != "pos_embed")),
    "imported",
  )
  m.adapters = mlc.ConfigDict()
  for name, (_, _, blocks) in adapters.items():
    rank = dims.motion_rank if name == "motion" else dims.content_rank
    m.adapters[name] = mlc.ConfigDict(
      dict(rank=rank, alpha=1.0, targets="q,k,v,out", blocks=list(blocks), switch=name == "motion")
    )
  root = pipeline.rstrip("/")
  has = lambda sub: bool(root) and (pathlib.Path(root) / sub / "config.json").is_file()
  if has("text_encoder"):
    config.text_encoder.update(
      kind="t5",
      path=f"{root}/text_encoder",
      tokenizer=f"{root}/tokenizer",
      dtype="bfloat16",
      attention_mask=False,
    )
  else:  # prompts need T5-v1.1-XXL embeddings: the byte encoder only keeps the shapes (cached text, tests)
    config.text_encoder.update(kind="byte", path="", tokenizer="")
  config.text_encoder.update(max_length=TEXT_TOKENS_PER_PROMPT, dim=dims.text_dim)
  rows, cols = det.grid
  spatial = 8  # CogVideoX's VAE; a pipeline's own VAE says (2 ** downsampling blocks)
  if has("vae"):
    spatial = 2 ** (
      len(
        json.loads((pathlib.Path(root) / "vae" / "config.json").read_text()).get(
          "block_out_channels", (0,) * 4
        )
      )
      - 1
    )
  config.data.update(
    frames=16, height=rows * dims.patch_size * spatial, width=cols * dims.patch_size * spatial
  )
  config.autoencoder = convert.default_autoencoder(
    config.autoencoder, dims.in_channels, f"{root}/vae" if root else ""
  )
  # The official VAE encodes the packed stack in one pass and samples the posterior (no tiling there).
  config.autoencoder.update(packed_pass=True, sample_posterior=True, tiling=False)
  tasks = {t: 1.0 if t == v.task else 0.0 for t in config.diffusion.task_weights}
  config.diffusion.task_weights = mlc.ConfigDict(tasks)
  config.diffusion.curriculum_steps = 0
  config.diffusion.given_latent_frames = mlc.ConfigDict(
    {v.task: list(v.given_latent_frames)} if v.given_latent_frames else {}
  )
  # Official stage 2: the content LoRA trains with the motion LoRA switched per sample (batch key motion_scale).
  config.train.update(trainable="adapters", trainable_adapters=("content",), ema_decay=0.0)
  config.train.adapter_scale_keys = mlc.ConfigDict({"motion": "motion_scale"})
  # Official sampling: SAT DPM-Solver++(2M), 50 steps, DynamicCFG(6, exp 5, 50 steps), motion LoRA off.
  config.sampling.update(
    remove_adapters=("motion",),
    sampler="sat_dpmpp_2m",
    guidance_scale=6.0,
    num_steps=50,
    dynamic_cfg=True,
    dynamic_cfg_steps=50,
    eta=0.0,
  )
  return config


def import_official(
  src: str | pathlib.Path,
  out: str | pathlib.Path,
  base: mlc.ConfigDict,
  *,
  variant: str | None = None,
  pipeline: str = "",
) -> dict:
  """Writes ``out/checkpoints/0`` from an official checkpoint; returns a summary (nothing written on error)."""
  out = pathlib.Path(out)
  if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
    raise OfficialImportError(f"{out} already holds checkpoints; import into a new directory")
  path = checkpoint_file(src)
  net, ignored = read_network(path)
  net = _plain_aliases(net)
  det = detect(net, src, variant)
  dims = det.dims
  adapters = {
    "motion": ("matrix_A", "matrix_B", _lora_blocks(net, dims.num_layers, "matrix_B")),
    "content": ("matrix_C", "matrix_D", _lora_blocks(net, dims.num_layers, "matrix_D")),
  }
  config = make_config(base, det, net, adapters, pipeline)
  exp = Experiment(config)
  model = dit.create_model(exp.model_cfg, seed=int(config.seed))
  dw.from_diffusers_state_dict(model, to_diffusers(net, dims))
  dw.from_extras_state_dict(model, to_extras(net, dims, adapters, det.variant.layer_embed))
  params = jax.device_get(partition.flatten(nnx.state(model).to_pure_dict()))
  state = exp.init_state(params=params)
  ck = ckpt_lib.Checkpointer(out)
  try:
    ck.save(
      0,
      state,
      meta={
        "config": ckpt_lib.config_to_meta(config),
        "step": 0,
        "imported_from": str(path.absolute()),
        "official_variant": det.variant.name,
        "decided_by": det.reasons,
      },
    )
  finally:
    ck.close()
  return {
    "out": str(out),
    "variant": det.variant.name,
    "network": det.variant.network,
    "task": det.variant.task,
    "decided_by": det.reasons,
    "source": str(path),
    "tensors": len(net),
    "ignored_keys": ignored,
    "dtype": "bfloat16" if _all_bf16(net) else "as stored (float32 model)",
    "adapters": {k: v[2] for k, v in adapters.items()},
    "autoencoder": config.autoencoder.kind,
    "text_encoder": config.text_encoder.kind,
  }
