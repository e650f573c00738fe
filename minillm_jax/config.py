"""The one config schema: defaults, types, validation and the resolved model config.

Every config file under configs/ starts from `default_config()` and changes values; `validate()` then checks
keys, types and consistency so a bad run fails at start with one line naming the field and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys

from ml_collections import ConfigDict, FieldReference


class UserError(Exception):
  """Bad input from the user (config, data, checkpoint, flags): entry points print the one-line message and
  exit 2 instead of a traceback."""


class ConfigError(UserError, ValueError):
  """A config value is wrong; the message names the field and how to fix it."""


# BPE vocabulary bounds: 256 byte-level base tokens + the 6 special tokens of minillm_jax.tokenizer.SPECIALS at
# the bottom; at the top, 2**18 keeps the embedding sane for the model sizes here (token files store uint32 above
# 65536 tokens, so the file format is not the limit).
BPE_MIN_VOCAB = 256 + 6
BPE_MAX_VOCAB = 2**18


def _none(t: type) -> FieldReference:
  return FieldReference(None, field_type=t)


def default_config() -> ConfigDict:
  c = ConfigDict()
  c.model = ConfigDict(dict(
      n_layer=4, n_head=4, n_kv_head=_none(int), d_model=128, d_ff=_none(int),
      vocab_size=_none(int),            # None: taken from the tokenizer
      block_size=64, max_positions=_none(int),  # None: block_size (learned table size / longest RoPE cache)
      pos='learned', rope_theta=10000.0, norm='layernorm', norm_eps=1e-5, mlp='gelu',
      bias=False, tie_embeddings=True, dropout=0.0, dtype='float32', init_std=0.02,
      remat='none'))                    # none | attention | block: recompute in the backward (model.gpt)
  c.data = ConfigDict(dict(
      corpus='shakespeare',             # shakespeare | python_code | mixed | local | hub | python_instruct
      format='text',                    # text: language modelling | chat: conversations, loss on the replies
      path='',                          # files/dirs for corpus=local (comma separated)
      code_path='', books_path='',      # corpus=mixed: your code / books instead of the stdlib / Shakespeare
      val_path='',                      # files/dirs used as the validation split as they are (no split)
      hub_name='', hub_config='', hub_revision='',  # config: a dataset's subset; revision: a branch, tag or commit
      hub_split='train', text_field='text',
      hub_val_split='auto',             # auto: the dataset's validation split if it has one | none: split | <name>
      hub_streaming=False,              # read the hub dataset as a stream, without downloading it whole
      tokenizer='char',                 # char | bpe | gpt2 | path to tokenizer.json | dir with vocab.json+merges.txt | hub:<name>
      tokenizer_train_chars=100_000_000,  # BPE: learn from at most this many training characters (sampled)
      vocab_size=_none(int),            # BPE target size; None: model.vocab_size
      val_fraction=0.1,                 # share of characters held out, split by whole documents
      code_weight=3.0,                  # corpus=mixed: code share of characters = w / (1 + w)
      max_docs=0,                       # 0: all documents; N: the first N of the corpus's fixed order
      cache_dir='',                     # '' : <repo>/data/cache (a wheel install: ~/.cache/minillm_jax/tokens)
      num_workers=0))                   # grain worker processes; part of the resume contract (state depends on it)
  c.optim = ConfigDict(dict(
      lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
      grad_clip=1.0, accum_steps=1, decay_embeddings=False))
  c.train = ConfigDict(dict(
      steps=2000, batch_size=12, eval_every=250, eval_batches=20, ckpt_every=500, keep=3,
      patience=0,                       # evals without improvement before stopping; 0 = never stop early
      seed=1337, init_from='', log_every=10, fsdp=False,
      cpu_devices=0,                    # CPU only: JAX devices to split the cores into; 0 = one per core (auto)
      steps_per_call=0,                 # steps per jitted call (lax.scan); 0 = auto: >1 only for small models
      peak_flops=_none(float),          # FLOP/s for MFU; None: measured matmul peak of the device
      wandb_project=''))                # '' = off; else log the metrics rows to this W&B project (`wandb` extra)
  c.sample = ConfigDict(dict(
      temperature=0.8, top_k=_none(int), top_p=1.0, repetition_penalty=1.0, repetition_window=64,
      max_new_tokens=256, prompt='', seed=0))
  return c


_CHOICES = {
    'model.pos': ('learned', 'rope'), 'model.norm': ('layernorm', 'rmsnorm'), 'model.mlp': ('gelu', 'swiglu'),
    'model.dtype': ('float32', 'bfloat16'), 'model.remat': ('none', 'attention', 'block'),
    'data.corpus': ('shakespeare', 'python_code', 'mixed', 'local', 'hub', 'python_instruct'),
    'data.format': ('text', 'chat'),
}
CHAT_CORPORA = ('python_instruct', 'local', 'hub')


def _schema() -> dict[str, tuple[type, bool]]:
  """field -> (type, nullable), read off default_config()."""
  out = {}
  for sec, sub in default_config().items():
    for k in sub:
      ref = sub._fields[k]
      if isinstance(ref, FieldReference):
        out[f'{sec}.{k}'] = (ref.get_type(), True)
      else:
        out[f'{sec}.{k}'] = (type(ref), False)
  return out


def _flat(cfg: ConfigDict) -> dict:
  out = {}
  for sec in cfg:
    sub = cfg[sec]
    if not isinstance(sub, (ConfigDict, dict)):
      out[sec] = sub
      continue
    for k in sub:
      out[f'{sec}.{k}'] = sub[k]
  return out


def no_variant(variant: str):
  """For presets without variants: `preset.py:typo` fails instead of silently giving the preset."""
  if variant:
    raise ConfigError(f'unknown variant {variant!r}: this preset has none (drop the :{variant})')


def preset_beside(here: str, name: str, variant: str = '') -> ConfigDict:
  """The preset `name`'s get_config(variant), loaded by path from the folder of `here` (the calling preset's
  __file__): a preset builds on another from any working directory, in a checkout and in an installed wheel."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f'_preset_{name}', os.path.join(os.path.dirname(here), f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def validate(cfg: ConfigDict) -> ConfigDict:
  """Raises ConfigError with a one-line message; returns cfg when valid, unchanged but for one rule:
  optim.warmup_steps above train.steps becomes train.steps // 10 (a tenth of the run), with a printed note."""
  schema, flat = _schema(), _flat(cfg)
  for name, value in flat.items():
    if name not in schema:
      near = difflib.get_close_matches(name, schema, n=1)
      hint = f'; did you mean {near[0]}?' if near else ''
      raise ConfigError(f'unknown config key {name}{hint}')
    t, nullable = schema[name]
    if value is None:
      if not nullable:
        raise ConfigError(f'{name} is None; give it a {t.__name__} value')
      continue
    ok = isinstance(value, t) and not (t is int and isinstance(value, bool))
    if t is float and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      raise ConfigError(f'{name}={value!r} has type {type(value).__name__}; it must be of type {t.__name__}')
  for name in schema:
    if name not in flat:
      raise ConfigError(f'config is missing {name}; start config files from minillm_jax.config.default_config()')
  for name, choices in _CHOICES.items():
    if flat[name] not in choices:
      raise ConfigError(f'{name}={flat[name]!r} is not one of {", ".join(choices)}')

  def need(cond: bool, msg: str):
    if not cond:
      raise ConfigError(msg)

  for name in ('model.n_layer', 'model.n_head', 'model.d_model', 'model.block_size', 'model.n_kv_head',
               'model.d_ff', 'model.vocab_size', 'model.max_positions', 'data.vocab_size', 'optim.accum_steps',
               'train.steps', 'train.batch_size', 'train.eval_every', 'train.eval_batches', 'train.ckpt_every',
               'train.keep', 'train.log_every', 'sample.max_new_tokens', 'sample.top_k', 'sample.repetition_window'):
    v = flat[name]
    need(v is None or v > 0, f'{name}={v} must be a positive integer')
  for name in ('optim.warmup_steps', 'optim.weight_decay', 'optim.grad_clip', 'optim.min_lr', 'train.patience',
               'model.dropout', 'sample.temperature', 'data.max_docs', 'data.num_workers', 'train.cpu_devices',
               'train.steps_per_call'):
    need(flat[name] >= 0, f'{name}={flat[name]} must be >= 0')
  m, o, t = cfg.model, cfg.optim, cfg.train
  need(m.d_model % m.n_head == 0,
       f'model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}; pick n_head dividing d_model')
  if m.n_kv_head is not None:
    need(m.n_head % m.n_kv_head == 0,
         f'model.n_kv_head={m.n_kv_head} does not divide model.n_head={m.n_head}; pick a divisor of n_head')
  if m.pos == 'rope':
    need((m.d_model // m.n_head) % 2 == 0, f'model.pos=rope needs an even head size, got '
         f'd_model/n_head={m.d_model // m.n_head}; change d_model or n_head')
    need(m.rope_theta > 0, f'model.rope_theta={m.rope_theta} must be > 0')
  if m.max_positions is not None:
    need(m.block_size <= m.max_positions, f'model.block_size={m.block_size} exceeds model.max_positions='
         f'{m.max_positions}; lower block_size or raise max_positions')
  need(m.dropout < 1, f'model.dropout={m.dropout} must be < 1')
  need(m.norm_eps > 0, f'model.norm_eps={m.norm_eps} must be > 0')
  need(m.init_std > 0, f'model.init_std={m.init_std} must be > 0')
  need(o.lr > 0, f'optim.lr={o.lr} must be > 0; a typical value is 1e-3 for small models')
  need(o.min_lr <= o.lr, f'optim.min_lr={o.min_lr} is above optim.lr={o.lr}; lower min_lr')
  if o.warmup_steps > t.steps:  # a quick run of a preset (train.steps=20): warm up over the run's first tenth
    note = (f'note: optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}; warming up over '
            f'{t.steps // 10} steps (a tenth of the run) instead')
    print(note, file=sys.stderr, flush=True)
    o.warmup_steps = t.steps // 10
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f'optim.b1={o.b1}, optim.b2={o.b2} must be in [0, 1)')
  need(o.eps > 0, f'optim.eps={o.eps} must be > 0')
  _validate_data(cfg, need)
  need(0 < cfg.sample.top_p <= 1, f'sample.top_p={cfg.sample.top_p} must be in (0, 1]')
  need(cfg.sample.repetition_penalty > 0, f'sample.repetition_penalty={cfg.sample.repetition_penalty} must be > 0')
  if t.peak_flops is not None:
    need(t.peak_flops > 0, f'train.peak_flops={t.peak_flops} must be > 0')
  return cfg


def _validate_data(cfg: ConfigDict, need):
  d = cfg.data
  need(0 < d.val_fraction < 1, f'data.val_fraction={d.val_fraction} must be in (0, 1)')
  need(d.code_weight >= 0, f'data.code_weight={d.code_weight} must be >= 0')
  need(d.corpus != 'local' or d.path.strip(), 'data.corpus=local needs data.path=FILE[,DIR,GLOB...] '
       '(.txt, .jsonl, .parquet)')
  need(d.corpus == 'mixed' or not (d.code_path or d.books_path), f'data.code_path and data.books_path are for '
       f'data.corpus=mixed, not {d.corpus}; use data.path for corpus=local')
  need(d.corpus != 'hub' or d.hub_name.strip(), 'data.corpus=hub needs data.hub_name, e.g. roneneldan/TinyStories')
  if d.format == 'chat':
    need(d.corpus in CHAT_CORPORA, f'data.format=chat reads conversations: data.corpus={d.corpus} is plain text; '
         'use python_instruct, local (.jsonl/.json/.parquet chat files) or hub')
  else:
    need(d.corpus != 'python_instruct', 'data.corpus=python_instruct holds conversations: set data.format=chat')
  need(d.text_field.strip() != '', 'data.text_field is empty; name the column that holds the text')
  need(d.hub_val_split.strip() != '', "data.hub_val_split is empty; use auto, none or a split name")
  need(d.tokenizer_train_chars >= 0, f'data.tokenizer_train_chars={d.tokenizer_train_chars} must be >= 0 (0: all)')
  need(d.tokenizer.strip() != '', 'data.tokenizer is empty; use char, bpe, a tokenizer.json path or hub:<name>')
  if d.tokenizer == 'bpe':
    v = d.vocab_size or cfg.model.vocab_size
    need(v is not None, 'data.tokenizer=bpe needs a vocabulary size: set data.vocab_size (or model.vocab_size)')
    need(BPE_MIN_VOCAB <= v <= BPE_MAX_VOCAB, f'BPE vocab size {v} is outside [{BPE_MIN_VOCAB}, {BPE_MAX_VOCAB}] '
         f'({BPE_MIN_VOCAB} = 256 byte tokens + special tokens); set data.vocab_size in that range')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Concrete, hashable model hyper-parameters (no None): what the model and the torch mirror are built from."""
  vocab_size: int
  n_layer: int = 4
  n_head: int = 4
  n_kv_head: int = 4
  d_model: int = 128
  d_ff: int = 512
  block_size: int = 64
  max_positions: int = 64
  pos: str = 'learned'
  rope_theta: float = 10000.0
  norm: str = 'layernorm'
  norm_eps: float = 1e-5
  mlp: str = 'gelu'
  bias: bool = False
  tie_embeddings: bool = True
  dropout: float = 0.0
  dtype: str = 'float32'
  init_std: float = 0.02
  remat: str = 'none'

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ConfigError(f'unknown model config keys {sorted(unknown)}')
    cfg = default_config()  # the values get the checks a config file gets (a .pt or HF config is input too)
    for k, v in d.items():
      try:
        cfg.model[k] = v
      except TypeError:
        raise ConfigError(f'model.{k}={v!r} has type {type(v).__name__}; it must be of type '
                          f'{_schema()[f"model.{k}"][0].__name__}') from None
    validate(cfg)
    return cls(**d)


def default_d_ff(d_model: int, mlp: str) -> int:
  if mlp == 'swiglu':  # Llama: 2/3 of 4d, rounded up to a multiple of 64
    return int(math.ceil(8 * d_model / 3 / 64) * 64)
  return 4 * d_model


def model_config(cfg: ConfigDict, vocab_size: int | None = None) -> ModelConfig:
  """Resolves Nones: vocab from the tokenizer (or data.vocab_size), d_ff and n_kv_head defaults."""
  m = cfg.model
  v = m.vocab_size or vocab_size or cfg.data.vocab_size
  if v is None:
    raise ConfigError('model.vocab_size is unset and no tokenizer gives it; set --config.model.vocab_size=N')
  return ModelConfig(
      vocab_size=int(v), n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head or m.n_head,
      d_model=m.d_model, d_ff=m.d_ff or default_d_ff(m.d_model, m.mlp), block_size=m.block_size,
      max_positions=m.max_positions or m.block_size, pos=m.pos, rope_theta=float(m.rope_theta), norm=m.norm,
      norm_eps=float(m.norm_eps), mlp=m.mlp, bias=m.bias, tie_embeddings=m.tie_embeddings,
      dropout=float(m.dropout), dtype=m.dtype, init_std=float(m.init_std), remat=m.remat)


def to_plain(cfg: ConfigDict) -> dict:
  """A JSON-able dict of plain types (safe for JSON, Orbax JsonSave and torch.load(weights_only=True))."""
  return cfg.to_dict()


def from_plain(d: dict) -> ConfigDict:
  """Back from to_plain(): default_config() with d's values, then validated."""
  cfg = default_config()
  for sec, sub in d.items():
    if sec not in cfg:
      raise ConfigError(f'unknown config section {sec}')
    for k, v in sub.items():
      if k not in cfg[sec]:
        raise ConfigError(f'unknown config key {sec}.{k}')
      cfg[sec][k] = tuple(v) if isinstance(v, list) else v
  return validate(cfg)


def absolute_paths(cfg: ConfigDict) -> ConfigDict:
  """Relative data.path entries, data.cache_dir, a data.tokenizer file and train.init_from, made absolute from
  the current directory: a run's config.json must mean the same files from anywhere (resume, evaluate)."""
  full = lambda p: os.path.abspath(os.path.expanduser(p))
  d = cfg.data
  if d.path:
    d.path = ','.join(full(e.strip()) for e in d.path.split(',') if e.strip())
  if d.cache_dir:
    d.cache_dir = full(d.cache_dir)
  if d.tokenizer not in ('char', 'bpe', 'gpt2') and not d.tokenizer.startswith('hub:'):
    d.tokenizer = full(d.tokenizer)
  if cfg.train.init_from:
    cfg.train.init_from = full(cfg.train.init_from)
  return cfg
