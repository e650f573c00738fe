"""Hugging Face directories (config.json, model.safetensors, tokenizer.json), both directions.

Export picks the one transformers class that computes exactly our function, or refuses naming what each lacks:
  pos=learned, LayerNorm, GELU MLP, n_kv_head == n_head  -> GPT2LMHeadModel (biases it lacks exported as 0)
  pos=rope, RMSNorm, SwiGLU (any bias, GQA, tied or not)  -> LlamaForCausalLM
  pos=rope, LayerNorm, GELU MLP, n_kv_head == n_head     -> GPTNeoXForCausalLM (rotary_pct=1, sequential)
GELU is the exact erf one ('gelu' in transformers' ACT2FN); zero biases add nothing, so they are exact.
config.json also carries our model config and meta under "minillm": importing our own export is bit-exact and
keeps block_size, dropout and the run config. An instruction-tuned run's export (chat's rule: meta
`instruction_tuned` and the chat tokens) also carries our chat template as tokenizer_config.json's `chat_template`
and ends generation at `<|end|>` (eos) or end-of-text. Import reads these three classes from a local directory
(safetensors, sharded safetensors or pytorch_model.bin) and refuses what our model cannot compute (parallel
residual, partial rotary, scaled RoPE, ...); approximate GELUs only with allow_inexact.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from minillm_jax.config import ModelConfig, UserError
from minillm_jax.data.template import END, hf_chat_template
from minillm_jax.data.tokenizer import CHAT, Tok
from minillm_jax.inference.backend import is_instruction_tuned
from torch_compat import convert
from torch_compat.common import Imported, export_meta, model_config_from, torch_load

CLASSES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM', 'neox': 'GPTNeoXForCausalLM'}
MODEL_TYPES = {'gpt2': 'gpt2', 'llama': 'llama', 'neox': 'gpt_neox'}
_EXACT_GELU = ('gelu', 'gelu_python')
_APPROX_GELU = ('gelu_new', 'gelu_fast', 'gelu_pytorch_tanh', 'gelu_accurate', 'quick_gelu')
_EOS = ('<|endoftext|>', '</s>', '<eos>', '<|eos|>', '<|end_of_text|>')


def arch_for(c: ModelConfig) -> str:
  """'gpt2' | 'llama' | 'neox': the HF class computing `c` exactly; else UserError naming what each lacks."""
  gqa = c.n_kv_head != c.n_head
  gqa_text = f'grouped-query attention (n_kv_head={c.n_kv_head} < n_head={c.n_head})'
  if c.pos == 'learned':
    lacks = [x for x, bad in (('RMSNorm', c.norm != 'layernorm'), ('SwiGLU MLPs', c.mlp != 'gelu'),
                              (gqa_text, gqa)) if bad]
    if not lacks:
      return 'gpt2'
    raise UserError(f'no Hugging Face export represents this model exactly: GPT-2 (the learned-position '
                    f'class) lacks {" and ".join(lacks)}, and Llama/GPT-NeoX use RoPE; use --format=pt')
  if c.norm == 'rmsnorm' and c.mlp == 'swiglu':
    return 'llama'
  if c.norm == 'layernorm' and c.mlp == 'gelu' and not gqa:
    return 'neox'
  llama = [x for x, bad in (('LayerNorm', c.norm == 'layernorm'), ('a non-gated GELU MLP', c.mlp == 'gelu'))
           if bad]
  neox = [x for x, bad in (('RMSNorm', c.norm == 'rmsnorm'), ('SwiGLU MLPs', c.mlp == 'swiglu'),
                           (gqa_text, gqa)) if bad]
  raise UserError(f'no Hugging Face export represents pos=rope, norm={c.norm}, mlp={c.mlp}'
                  f'{", n_kv_head<n_head" if gqa else ""} exactly: Llama lacks {" and ".join(llama)}, '
                  f'GPT-NeoX lacks {" and ".join(neox)}; use --format=pt')


def hf_config(c: ModelConfig, fmt: str, tokenizer_json: str | None = None) -> dict:
  """config.json for `fmt`, with the legacy key names that transformers 4.x and 5.x both read."""
  if fmt == 'gpt2':
    d = {'n_positions': c.max_positions, 'n_embd': c.d_model, 'n_layer': c.n_layer, 'n_head': c.n_head,
         'n_inner': c.d_ff, 'activation_function': 'gelu', 'layer_norm_epsilon': c.norm_eps,
         'resid_pdrop': c.dropout, 'embd_pdrop': c.dropout, 'attn_pdrop': c.dropout,
         'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
         'reorder_and_upcast_attn': False}
  elif fmt == 'llama':
    d = {'hidden_size': c.d_model, 'intermediate_size': c.d_ff, 'num_hidden_layers': c.n_layer,
         'num_attention_heads': c.n_head, 'num_key_value_heads': c.n_kv_head, 'head_dim': c.head_dim,
         'hidden_act': 'silu', 'max_position_embeddings': c.max_positions, 'rms_norm_eps': c.norm_eps,
         'rope_theta': c.rope_theta, 'rope_scaling': None, 'attention_bias': c.bias, 'mlp_bias': c.bias,
         'attention_dropout': c.dropout, 'pretraining_tp': 1}
  else:
    d = {'hidden_size': c.d_model, 'intermediate_size': c.d_ff, 'num_hidden_layers': c.n_layer,
         'num_attention_heads': c.n_head, 'hidden_act': 'gelu', 'rotary_pct': 1.0,
         'rotary_emb_base': c.rope_theta, 'max_position_embeddings': c.max_positions,
         'layer_norm_eps': c.norm_eps, 'use_parallel_residual': False, 'attention_bias': c.bias,
         'hidden_dropout': c.dropout, 'attention_dropout': c.dropout}
  eos = special_id(tokenizer_json, c.vocab_size)
  return {'architectures': [CLASSES[fmt]], 'model_type': MODEL_TYPES[fmt], 'vocab_size': c.vocab_size, **d,
          'tie_word_embeddings': c.tie_embeddings, 'initializer_range': c.init_std, 'use_cache': True,
          'bos_token_id': eos, 'eos_token_id': eos, 'pad_token_id': None, 'torch_dtype': 'float32'}


def special_id(tokenizer_json: str | None, vocab_size: int) -> int | None:
  """Id of the end-of-text token of a tokenizer.json, if it has a usual one inside the vocabulary."""
  if not tokenizer_json:
    return None
  try:
    tok = json.loads(tokenizer_json)
  except ValueError:
    return None
  for t in tok.get('added_tokens') or []:
    if t.get('content') in _EOS and isinstance(t.get('id'), int) and t['id'] < vocab_size:
      return t['id']
  vocab = (tok.get('model') or {}).get('vocab')
  if isinstance(vocab, dict):
    for s in _EOS:
      if isinstance(vocab.get(s), int) and vocab[s] < vocab_size:
        return vocab[s]
  return None


HF_FILES = ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json')


def save_hf(out_dir: str, c: ModelConfig, flat: dict, tokenizer_json: str | None, meta: dict) -> None:
  from safetensors.torch import save_file
  fmt = arch_for(c)
  sd = convert.flax_to_torch(c, flat, fmt)
  cfg = hf_config(c, fmt, tokenizer_json)
  chat = _chat_tok(tokenizer_json, meta)
  if chat:  # a reply ends at <|end|>: transformers' generate stops there or at end-of-text, as our chat does
    end, eot = chat.token_to_id(END), cfg['eos_token_id']
    cfg['eos_token_id'] = [end] + ([eot] if eot is not None and eot != end else [])
  cfg['minillm'] = {'model_config': c.to_dict(), 'meta': export_meta(meta)}
  if os.path.isfile(out_dir):
    raise UserError(f'--out={out_dir} is a file; the hf format writes a directory')
  other = sorted(set(os.listdir(out_dir)) - set(HF_FILES)) if os.path.isdir(out_dir) else []
  if other:  # e.g. a run's workdir: its config.json would be overwritten
    raise UserError(f'--out={out_dir} already holds other files ({", ".join(other[:4])}); export into a new '
                    'directory (or one holding only a previous export)')
  os.makedirs(out_dir, exist_ok=True)
  for name in ('tokenizer.json', 'tokenizer_config.json'):  # a previous export's, when this one has none
    if not tokenizer_json and os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))
  save_file(sd, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2)
  # safetensors writes its file owner-only (0600); give it the umask's mode, as config.json has, so a shared
  # export directory is readable by the others who can read the rest of it
  shutil.copymode(os.path.join(out_dir, 'config.json'), os.path.join(out_dir, 'model.safetensors'))
  if tokenizer_json:
    with open(os.path.join(out_dir, 'tokenizer.json'), 'w') as f:
      f.write(tokenizer_json)
    eos = cfg['eos_token_id']
    tc = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': c.block_size}
    if chat:
      # The tokenizer's eos is the token that ends a turn (as Llama-3-Instruct's and Qwen2-Instruct's are), the
      # first of config.json's eos list; bos stays end-of-text, as config.json's bos_token_id. The chat tokens
      # are listed as special for tools that read them here rather than from tokenizer.json's added tokens.
      tc['eos_token'] = END
      if cfg['bos_token_id'] is not None:
        tc['bos_token'] = _token_text(tokenizer_json, cfg['bos_token_id'])
      tc['additional_special_tokens'] = list(CHAT)
      tc['chat_template'] = hf_chat_template()
    elif eos is not None:
      tc['eos_token'] = tc['bos_token'] = _token_text(tokenizer_json, eos)
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
      json.dump(tc, f, indent=2)


def _chat_tok(tokenizer_json: str | None, meta: dict) -> Tok | None:
  """The tokenizer when the export is instruction-tuned by chat's own rule (meta and the chat tokens), else None."""
  if not tokenizer_json or not meta.get('instruction_tuned'):
    return None  # checked first: every other export is written exactly as before, its tokenizer never parsed
  try:
    tok = Tok.from_json_str(tokenizer_json)
  except UserError:  # e.g. no end-of-text token: no backend of ours loads it, so it never chats with the template
    return None
  return tok if is_instruction_tuned(meta, tok) else None


def _token_text(tokenizer_json: str, i: int) -> str | None:
  tok = json.loads(tokenizer_json)
  for t in tok.get('added_tokens') or []:
    if t.get('id') == i:
      return t.get('content')
  vocab = (tok.get('model') or {}).get('vocab') or {}
  return next((s for s, j in vocab.items() if j == i), None) if isinstance(vocab, dict) else None


# --------------------------------------------------------------------------------------------------- import

def read_weights(d: str) -> dict[str, torch.Tensor]:
  """model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin (weights_only)."""
  st = os.path.join(d, 'model.safetensors')
  if os.path.isfile(st):
    return _load_safetensors(st)
  if os.path.isfile(st + '.index.json'):
    try:
      with open(st + '.index.json') as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise UserError(f'cannot read {st}.index.json (needs a "weight_map" of tensor -> shard file): '
                      f'{type(e).__name__}: {e}') from None
    sd = {}
    for s in shards:
      sd.update(_load_safetensors(os.path.join(d, s)))
    return sd
  b = os.path.join(d, 'pytorch_model.bin')
  if os.path.isfile(b):
    return torch_load(b)
  raise UserError(f'{d} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin')


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
  from safetensors.torch import load_file
  if not os.path.isfile(path):
    raise UserError(f'{path} does not exist (named by model.safetensors.index.json)')
  from safetensors import SafetensorError
  try:
    return load_file(path)
  except SafetensorError as e:
    raise UserError(f'{path} is not a readable safetensors file (corrupt or truncated: '
                    f'{str(e).splitlines()[0][:160] if str(e) else type(e).__name__})') from None


def load_hf(d: str, allow_inexact: bool = False) -> Imported:
  try:
    with open(os.path.join(d, 'config.json')) as f:
      j = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {d}/config.json: {e}') from None
  if not isinstance(j, dict):
    raise UserError(f'{d}/config.json holds a {type(j).__name__}, not a Hugging Face config object')
  fmt = _fmt_of(j, d)
  sd = convert.strip_prefixes(read_weights(d))
  if fmt == 'gpt2':  # the original OpenAI GPT-2 files name GPT2Model's tensors without 'transformer.'
    sd = {k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k: v for k, v in sd.items()}
  ours = (j.get('minillm') or {}) if isinstance(j.get('minillm'), dict) else {}
  notes: list[str] = []
  if isinstance(ours.get('model_config'), dict):
    c, zero_missing = model_config_from(ours['model_config'], d), False
    if arch_for(c) != fmt:
      raise UserError(f'{d}: config.json says {CLASSES[fmt]} but its minillm model_config exports as '
                      f'{CLASSES[arch_for(c)]}')
  else:
    try:
      c, zero_missing = _model_config(fmt, j, sd, d, allow_inexact, notes)
    except (TypeError, AttributeError, KeyError, ValueError, ZeroDivisionError) as e:  # wrong type or form
      raise UserError(f'{d}/config.json: a value has an unexpected type or form ({type(e).__name__}: {e})') from None
  flat = convert.torch_to_flax(c, sd, fmt, zero_missing_bias=zero_missing)
  tok = ''
  if os.path.isfile(os.path.join(d, 'tokenizer.json')):
    with open(os.path.join(d, 'tokenizer.json')) as f:
      tok = f.read()
  meta = dict(ours.get('meta') or {}) or {'hf_source': os.path.abspath(d)}
  return Imported('hf-' + fmt, c, flat, tok, meta, notes)


def _fmt_of(j: dict, d: str) -> str:
  archs = j.get('architectures') or [None]
  arch = archs if isinstance(archs, str) else archs[0] if isinstance(archs, list) else archs
  for fmt, cls in CLASSES.items():
    if arch == cls or (arch is None and j.get('model_type') == MODEL_TYPES[fmt]):
      return fmt
  raise UserError(f'{d}: architecture {arch or j.get("model_type")!r} is not supported; import reads '
                  f'{", ".join(CLASSES.values())}')


def _model_config(fmt: str, j: dict, sd: dict, d: str, allow_inexact: bool,
                  notes: list) -> tuple[ModelConfig, bool]:
  """ModelConfig from a foreign config.json (transformers' defaults for absent keys); refuses what we cannot
  compute. Returns (config, zero_missing_bias)."""
  def refuse(msg):
    raise UserError(f'{d}: {msg}; minillm cannot compute this model exactly')

  def gelu(act):
    if act in _EXACT_GELU:
      return
    if act not in _APPROX_GELU:
      refuse(f'activation {act!r} is not GELU')
    if not allow_inexact:
      raise UserError(f'{d}: activation {act!r} is an approximate GELU and minillm computes the exact one; '
                      'pass --allow_inexact to import anyway (logits will differ slightly)')
    notes.append(f'activation {act} imported as exact GELU (logits will differ slightly)')

  g = j.get
  rp = g('rope_parameters') or g('rope_scaling') or {}
  if rp.get('rope_type', rp.get('type', 'default')) != 'default':
    refuse(f'RoPE scaling {rp.get("rope_type", rp.get("type"))!r}')
  nonzero_bias = any(k.endswith('.bias') and t.is_floating_point() and bool(torch.count_nonzero(t))
                     for k, t in sd.items() if not convert.BUFFERS.search(k))
  if fmt == 'gpt2':
    gelu(g('activation_function', 'gelu_new'))
    if not g('scale_attn_weights', True) or g('scale_attn_by_inverse_layer_idx') or g('add_cross_attention'):
      refuse('attention scaling/cross-attention options differ from standard GPT-2')
    D, N, n_pos = g('n_embd', 768), g('n_head', 12), g('n_positions', 1024)
    kw = {'n_layer': g('n_layer', 12), 'd_ff': g('n_inner') or 4 * D, 'pos': 'learned', 'norm': 'layernorm',
          'mlp': 'gelu', 'norm_eps': g('layer_norm_epsilon', 1e-5),
          'tie_embeddings': g('tie_word_embeddings', True), 'dropout': g('resid_pdrop', 0.1),
          'bias': nonzero_bias}
  elif fmt == 'llama':
    if g('hidden_act', 'silu') not in ('silu', 'swish'):
      refuse(f'hidden_act {g("hidden_act")!r} (minillm SwiGLU uses silu)')
    D, N, n_pos = g('hidden_size', 4096), g('num_attention_heads', 32), g('max_position_embeddings', 2048)
    if (g('head_dim') or D // N) != D // N or rp.get('partial_rotary_factor', 1.0) != 1.0:
      refuse(f'head_dim={g("head_dim")} differs from hidden_size/num_attention_heads={D // N} '
             'or the rotary is partial')
    kw = {'n_layer': g('num_hidden_layers', 32), 'n_kv_head': g('num_key_value_heads') or N,
          'd_ff': g('intermediate_size', 11008), 'pos': 'rope',
          'rope_theta': float(rp.get('rope_theta', g('rope_theta', 10000.0))), 'norm': 'rmsnorm',
          'mlp': 'swiglu',
          'norm_eps': g('rms_norm_eps', 1e-6), 'tie_embeddings': g('tie_word_embeddings', False),
          'dropout': g('attention_dropout', 0.0), 'bias': bool(g('attention_bias') or g('mlp_bias'))}
  else:
    gelu(g('hidden_act', 'gelu'))
    if g('use_parallel_residual', True):
      refuse('use_parallel_residual=True (attention and MLP in parallel; minillm blocks are sequential)')
    rot = float(rp.get('partial_rotary_factor', g('rotary_pct', 0.25)))
    if rot != 1.0:
      refuse(f'partial rotary (rotary_pct={rot}; minillm rotates the whole head)')
    D, N, n_pos = g('hidden_size', 6144), g('num_attention_heads', 64), g('max_position_embeddings', 2048)
    kw = {'n_layer': g('num_hidden_layers', 44), 'd_ff': g('intermediate_size', 24576), 'pos': 'rope',
          'rope_theta': float(rp.get('rope_theta', g('rotary_emb_base', 10000.0))), 'norm': 'layernorm',
          'mlp': 'gelu', 'norm_eps': g('layer_norm_eps', 1e-5),
          'tie_embeddings': g('tie_word_embeddings', False), 'dropout': g('hidden_dropout', 0.0),
          'bias': nonzero_bias}
  wte = sd.get(convert.torch_names(fmt, 'wte')[0])
  V = g('vocab_size') or (wte.shape[0] if wte is not None else None)
  if not V:
    refuse('config.json has no vocab_size')
  kw = {'n_head': N, 'n_kv_head': N, **kw, 'd_model': D, 'max_positions': n_pos, 'block_size': n_pos}
  kw['norm_eps'], kw['dropout'] = float(kw['norm_eps']), float(kw['dropout'])
  try:
    c = ModelConfig.from_dict({'vocab_size': int(V), 'init_std': float(g('initializer_range', 0.02)), **kw})
  except (TypeError, ValueError) as e:
    raise UserError(f'{d}: bad config.json: {e}') from None
  return c, c.bias
