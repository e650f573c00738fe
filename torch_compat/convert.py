"""The one table between the Flax parameters and every torch layout, and the Flax side of loading them.

Layouts (`fmt`): 'pt' (the torch mirror, torch_compat.model; also what nanoGPT uses), 'nanogpt' (the same
names plus nanoGPT's tied lm_head entry), and the Hugging Face classes 'gpt2' (GPT2LMHeadModel), 'llama'
(LlamaForCausalLM) and 'neox' (GPTNeoXForCausalLM). Every format module converts through flax_to_torch /
torch_to_flax, so a name or layout lives in exactly one place: TABLE below plus the three layout rules in
_to_torch (kernel transpose, q/k/v and gate/up split, NeoX's per-head q/k/v interleave).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from minillm_jax.config import ModelConfig, UserError
from minillm_jax.model import GPT

FORMATS = ('pt', 'nanogpt', 'gpt2', 'llama', 'neox')
_COL = {'pt': 0, 'nanogpt': 0, 'gpt2': 1, 'llama': 2, 'neox': 3}
_H, _L, _N = 'transformer.h.{i}.', 'model.layers.{i}.', 'gpt_neox.layers.{i}.'

# Flax flat name -> torch name(s) per layout column: mirror/nanoGPT, HF GPT-2, HF Llama, HF GPT-NeoX. '{i}' is
# the layer; a tuple is one Flax tensor split into several; None: the layout cannot hold it.
TABLE: dict[str, tuple] = {
    'wte': ('transformer.wte.weight', 'transformer.wte.weight', 'model.embed_tokens.weight',
            'gpt_neox.embed_in.weight'),
    'wpe': ('transformer.wpe.weight', 'transformer.wpe.weight', None, None),
    'blocks.{i}.ln1.scale': (_H + 'ln_1.weight', _H + 'ln_1.weight', _L + 'input_layernorm.weight',
                             _N + 'input_layernorm.weight'),
    'blocks.{i}.ln1.bias': (_H + 'ln_1.bias', _H + 'ln_1.bias', None, _N + 'input_layernorm.bias'),
    'blocks.{i}.attn.qkv.kernel': (_H + 'attn.c_attn.weight', _H + 'attn.c_attn.weight',
                                   tuple(_L + f'self_attn.{p}_proj.weight' for p in 'qkv'),
                                   _N + 'attention.query_key_value.weight'),
    'blocks.{i}.attn.qkv.bias': (_H + 'attn.c_attn.bias', _H + 'attn.c_attn.bias',
                                 tuple(_L + f'self_attn.{p}_proj.bias' for p in 'qkv'),
                                 _N + 'attention.query_key_value.bias'),
    'blocks.{i}.attn.proj.kernel': (_H + 'attn.c_proj.weight', _H + 'attn.c_proj.weight',
                                    _L + 'self_attn.o_proj.weight', _N + 'attention.dense.weight'),
    'blocks.{i}.attn.proj.bias': (_H + 'attn.c_proj.bias', _H + 'attn.c_proj.bias',
                                  _L + 'self_attn.o_proj.bias', _N + 'attention.dense.bias'),
    'blocks.{i}.ln2.scale': (_H + 'ln_2.weight', _H + 'ln_2.weight', _L + 'post_attention_layernorm.weight',
                             _N + 'post_attention_layernorm.weight'),
    'blocks.{i}.ln2.bias': (_H + 'ln_2.bias', _H + 'ln_2.bias', None, _N + 'post_attention_layernorm.bias'),
    'blocks.{i}.mlp.fc.kernel': (_H + 'mlp.c_fc.weight', _H + 'mlp.c_fc.weight',
                                 (_L + 'mlp.gate_proj.weight', _L + 'mlp.up_proj.weight'),
                                 _N + 'mlp.dense_h_to_4h.weight'),
    'blocks.{i}.mlp.fc.bias': (_H + 'mlp.c_fc.bias', _H + 'mlp.c_fc.bias',
                               (_L + 'mlp.gate_proj.bias', _L + 'mlp.up_proj.bias'),
                               _N + 'mlp.dense_h_to_4h.bias'),
    'blocks.{i}.mlp.proj.kernel': (_H + 'mlp.c_proj.weight', _H + 'mlp.c_proj.weight',
                                   _L + 'mlp.down_proj.weight', _N + 'mlp.dense_4h_to_h.weight'),
    'blocks.{i}.mlp.proj.bias': (_H + 'mlp.c_proj.bias', _H + 'mlp.c_proj.bias', _L + 'mlp.down_proj.bias',
                                 _N + 'mlp.dense_4h_to_h.bias'),
    'ln_f.scale': ('transformer.ln_f.weight', 'transformer.ln_f.weight', 'model.norm.weight',
                   'gpt_neox.final_layer_norm.weight'),
    'ln_f.bias': ('transformer.ln_f.bias', 'transformer.ln_f.bias', None, 'gpt_neox.final_layer_norm.bias'),
    'head.kernel': ('lm_head.weight', 'lm_head.weight', 'lm_head.weight', 'embed_out.weight'),
}
# Other names a checkpoint may carry for the same tensor (newer transformers renames NeoX's embed_out).
ALIASES = {'lm_head.weight': ('embed_out.weight',), 'embed_out.weight': ('lm_head.weight',)}
# Biases the HF class always has; a bias-free config exports them as zeros, which computes the same function.
_ALWAYS_BIAS = {
    'gpt2': ('ln1.bias', 'ln2.bias', 'ln_f.bias', 'qkv.bias', 'attn.proj.bias', 'fc.bias', 'mlp.proj.bias'),
    'neox': ('ln1.bias', 'ln2.bias', 'ln_f.bias', 'fc.bias', 'mlp.proj.bias'),
}
# Non-parameter buffers that old checkpoints carry (causal masks, RoPE frequencies): skipped on import.
BUFFERS = re.compile(r'(?:^|\.)(?:attn|attention)\.(?:bias|masked_bias)$|rotary_emb\.inv_freq$')
_PREFIXES = ('_orig_mod.', 'module.')  # torch.compile and DistributedDataParallel wrappers


def flax_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Flat Flax parameter name -> shape, without allocating (nnx.eval_shape)."""
  return dict(_shapes(c))


@functools.lru_cache(maxsize=16)  # every conversion asks several times
def _shapes(c: ModelConfig) -> tuple:
  # A one-layer model is traced and its block repeated: the table costs the same for 2 layers or for the
  # 2,000 a file may claim, so a file's tensors are checked against its config before any model is built.
  abstract = nnx.eval_shape(lambda: GPT(dataclasses.replace(c, n_layer=1), nnx.Rngs(params=0)))
  flat = [('.'.join(map(str, k)), tuple(v.get_value().shape))
          for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
  block = [(n.removeprefix('blocks.0.'), s) for n, s in flat if n.startswith('blocks.0.')]
  first = next(i for i, (n, _) in enumerate(flat) if n.startswith('blocks.0.'))
  layers = [(f'blocks.{i}.{n}', s) for i in range(c.n_layer) for n, s in block]
  rest = [(n, s) for n, s in flat if not n.startswith('blocks.')]
  return tuple(rest[:first] + layers + rest[first:])


def flax_flat(model: GPT) -> dict[str, np.ndarray]:
  """The model's parameters as {flat name: numpy array}."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {'.'.join(map(str, k)): np.asarray(v[...]) for k, v in flat}


def load_into_flax(c: ModelConfig, flat: dict[str, np.ndarray]) -> GPT:
  """A GPT with exactly these parameters (names and shapes checked against the config)."""
  _check_flax(c, flat)
  gdef, state = nnx.split(nnx.eval_shape(lambda: GPT(c, nnx.Rngs(params=0))))
  nested: dict = {}
  for name, a in flat.items():
    d = nested
    *head, last = [int(p) if p.isdigit() else p for p in name.split('.')]
    for p in head:
      d = d.setdefault(p, {})
    d[last] = jnp.asarray(a)
  nnx.replace_by_pure_dict(state, nested)
  return nnx.merge(gdef, state)


def to_numpy(t: torch.Tensor) -> np.ndarray:
  """float32 numpy copy of a torch tensor of any float dtype (bf16 has no numpy type; widening is exact)."""
  return t.detach().to('cpu', torch.float32).numpy().copy()


def _check_flax(c: ModelConfig, flat: dict[str, np.ndarray]):
  want = flax_shapes(c)
  for name, shape in want.items():
    if name not in flat:
      raise UserError(f'parameter {name} is missing (expected shape {shape})')
    if tuple(flat[name].shape) != shape:
      raise UserError(f'parameter {name}: expected shape {shape} for this model config, found '
                      f'{tuple(flat[name].shape)}')
  extra = sorted(set(flat) - set(want))
  if extra:
    raise UserError(f'unexpected parameters {extra[:3]} for this model config (bias={c.bias}, '
                    f'tie_embeddings={c.tie_embeddings}, pos={c.pos})')


def torch_names(fmt: str, flax_name: str) -> tuple[str, ...]:
  """The torch tensor name(s) of one Flax parameter in layout `fmt` (TABLE's row, layer filled in)."""
  i = re.search(r'blocks\.(\d+)\.', flax_name)
  row = TABLE[re.sub(r'blocks\.\d+\.', 'blocks.{i}.', flax_name)][_COL[fmt]]
  if row is None:
    raise UserError(f'{fmt} layout has no tensor for {flax_name}')
  row = row if isinstance(row, tuple) else (row,)
  return tuple(n.format(i=i.group(1)) if i else n for n in row)


def _to_torch(c: ModelConfig, fmt: str, name: str, a: np.ndarray) -> list[np.ndarray]:
  """The three layout rules, Flax -> torch. Kernels are [in, out] in Flax and HF Conv1D (GPT-2 blocks),
  [out, in] in nn.Linear. The fused q|k|v and gate|up are split for Llama; NeoX interleaves q/k/v per head."""
  if fmt == 'neox' and '.attn.qkv.' in name:  # [.., 3, N, hd] -> [.., N, 3, hd]
    lead = a.shape[:-1]
    a = a.reshape(*lead, 3, c.n_head, c.head_dim).swapaxes(-3, -2).reshape(*lead, -1)
  parts = [a]
  if fmt == 'llama' and '.attn.qkv.' in name:
    parts = np.split(a, [c.n_head * c.head_dim, (c.n_head + c.n_kv_head) * c.head_dim], axis=-1)
  elif fmt == 'llama' and '.mlp.fc.' in name:
    parts = np.split(a, 2, axis=-1)
  if _transposed(fmt, name):
    parts = [p.T for p in parts]
  return parts


def _transposed(fmt: str, name: str) -> bool:
  # HF GPT-2's blocks use Conv1D ([in, out], like Flax) but its lm_head is an nn.Linear ([out, in])
  return name.endswith('kernel') and (fmt != 'gpt2' or name == 'head.kernel')


def _to_flax(c: ModelConfig, fmt: str, name: str, parts: list[np.ndarray]) -> np.ndarray:
  """Inverse of _to_torch."""
  if _transposed(fmt, name):
    parts = [p.T for p in parts]
  a = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
  if fmt == 'neox' and '.attn.qkv.' in name:
    lead = a.shape[:-1]
    a = a.reshape(*lead, c.n_head, 3, c.head_dim).swapaxes(-3, -2).reshape(*lead, -1)
  return np.ascontiguousarray(a, dtype=np.float32)


def _zero_biases(c: ModelConfig, fmt: str, have: dict) -> dict[str, tuple[int, ...]]:
  """Flax name -> shape of the biases the layout always holds but this (bias-free) config lacks."""
  if c.bias or fmt not in _ALWAYS_BIAS:
    return {}
  full = flax_shapes(dataclasses.replace(c, bias=True))
  return {n: s for n, s in full.items() if n not in have and n.endswith(_ALWAYS_BIAS[fmt])}


def torch_shapes(c: ModelConfig, fmt: str) -> dict[str, tuple[int, ...]]:
  """Torch name -> shape of the layout for this config (zero-stride arrays: nothing is allocated)."""
  have = flax_shapes(c)
  out = {}
  for name, shape in {**have, **_zero_biases(c, fmt, have)}.items():
    parts = _to_torch(c, fmt, name, np.broadcast_to(np.float32(0), shape))
    out.update({n: tuple(p.shape) for n, p in zip(torch_names(fmt, name), parts)})
  return out


def flax_to_torch(c: ModelConfig, flat: dict[str, np.ndarray], fmt: str = 'pt') -> dict[str, torch.Tensor]:
  """state_dict in layout `fmt` (contiguous float32 tensors, none shared except nanoGPT's tied lm_head)."""
  _check_flax(c, flat)
  sd = {}
  zeros = {name: np.zeros(shape, np.float32) for name, shape in _zero_biases(c, fmt, flat).items()}
  for name, a in {**flat, **zeros}.items():
    for n, p in zip(torch_names(fmt, name), _to_torch(c, fmt, name, np.asarray(a, np.float32))):
      sd[n] = torch.from_numpy(np.array(p, np.float32, order='C'))  # an owned copy: safetensors refuses views
  if fmt == 'nanogpt' and c.tie_embeddings:  # nanoGPT's GPT always has lm_head, sharing wte's tensor
    sd['lm_head.weight'] = sd['transformer.wte.weight']
  return sd


def strip_prefixes(sd: dict) -> dict:
  out = {}
  for k, v in sd.items():
    for p in _PREFIXES:
      k = k.removeprefix(p)
    out[k] = v
  return out


def torch_to_flax(c: ModelConfig, sd: dict, fmt: str = 'pt',
                  zero_missing_bias: bool = False) -> dict[str, np.ndarray]:
  """Flat Flax params from a state_dict in layout `fmt`. Missing, unexpected or misshapen tensors raise
  UserError naming the tensor (and the expected and found shapes). `zero_missing_bias`: a bias the file lacks
  is zero (HF configs that switch biases off per layer type, e.g. Llama attention_bias != mlp_bias)."""
  sd = {k: v for k, v in strip_prefixes(sd).items() if not BUFFERS.search(k)}
  have, used, flat = flax_shapes(c), set(), {}
  for name, shape in have.items():
    names = torch_names(fmt, name)
    want = [tuple(p.shape) for p in _to_torch(c, fmt, name, np.broadcast_to(np.float32(0), shape))]
    found = [_lookup(sd, n) for n in names]
    if all(f is None for f in found) and zero_missing_bias and name.endswith('bias'):
      flat[name] = np.zeros(shape, np.float32)
      continue
    parts = []
    for n, f, w in zip(names, found, want):
      if f is None:
        raise UserError(f'checkpoint lacks tensor {n} (expected shape {w}) needed for {name}')
      key, t = f
      if tuple(t.shape) != w:
        raise UserError(f'tensor {key}: expected shape {w}, found {tuple(t.shape)}')
      used.add(key)
      parts.append(to_numpy(t))
    flat[name] = _to_flax(c, fmt, name, parts)
  for name, shape in _zero_biases(c, fmt, have).items():  # in the layout, not in this config: must be 0
    for n, p in zip(torch_names(fmt, name), _to_torch(c, fmt, name, np.broadcast_to(np.float32(0), shape))):
      f = _lookup(sd, n)
      if f is not None:
        used.add(f[0])
        if tuple(f[1].shape) != p.shape:
          raise UserError(f'tensor {f[0]}: expected shape {p.shape}, found {tuple(f[1].shape)}')
        if torch.count_nonzero(f[1]):
          raise UserError(f'tensor {f[0]} is nonzero but the model config has bias=False')
  if c.tie_embeddings:  # a tied head saved anyway (nanoGPT always, some HF saves) must equal the embedding
    wte = torch_names(fmt, 'wte')[0]
    f = _lookup(sd, torch_names(fmt, 'head.kernel')[0])
    if f is not None:
      used.add(f[0])
      if tuple(f[1].shape) != tuple(sd[wte].shape) or not torch.equal(f[1], sd[wte]):
        raise UserError(f'tensor {f[0]} differs from {wte} but the model config ties them '
                        '(tie_embeddings=True)')
  extra = sorted(set(sd) - used)
  if extra:
    more = ' ...' if len(extra) > 4 else ''
    raise UserError(f'unexpected tensors {extra[:4]}{more} for a {fmt} checkpoint of this config '
                    f'(bias={c.bias}, tie_embeddings={c.tie_embeddings}, pos={c.pos}, mlp={c.mlp})')
  return flat


def _lookup(sd: dict, name: str):
  for n in (name, *ALIASES.get(name, ())):
    if n in sd:
      return n, sd[n]
  return None
