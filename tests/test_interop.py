"""torch_compat against the outside tools: nanoGPT's own model code loading our export, and Hugging Face
directories written and read by transformers itself. Tiny models, CPU, offline."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_fixtures import (
  ALL_HF,
  BASE,
  FAMILIES,
  TOK,
  assert_flat_equal,
  jax_logits,
  mirror,
  random_flat,
  tokens,
)

from minillm_jax.config import UserError
from torch_compat import formats, hf, nanogpt

# ------------------------------------------------------------------------------------------------ nanoGPT

@dataclasses.dataclass
class GPTConfig:  # nanoGPT's model.py, compacted (upstream karpathy/nanoGPT)
  block_size: int = 1024
  vocab_size: int = 50304
  n_layer: int = 12
  n_head: int = 12
  n_embd: int = 768
  dropout: float = 0.0
  bias: bool = True


class NanoLayerNorm(nn.Module):
  def __init__(self, ndim, bias):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(ndim))
    self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
    self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
    self.n_head, self.n_embd = c.n_head, c.n_embd

  def forward(self, x):
    B, T, C = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoMLP(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.c_fc, self.gelu = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias), nn.GELU()
    self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

  def forward(self, x):
    return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.ln_1, self.attn = NanoLayerNorm(c.n_embd, c.bias), NanoAttention(c)
    self.ln_2, self.mlp = NanoLayerNorm(c.n_embd, c.bias), NanoMLP(c)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.config = c
    self.transformer = nn.ModuleDict({
        'wte': nn.Embedding(c.vocab_size, c.n_embd), 'wpe': nn.Embedding(c.block_size, c.n_embd),
        'drop': nn.Dropout(c.dropout), 'h': nn.ModuleList([NanoBlock(c) for _ in range(c.n_layer)]),
        'ln_f': NanoLayerNorm(c.n_embd, bias=c.bias)})
    self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight

  def forward(self, idx, targets=None):
    pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
    x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
    for block in self.transformer.h:
      x = block(x)
    x = self.transformer.ln_f(x)
    return (self.lm_head(x), None) if targets is not None else (self.lm_head(x[:, [-1], :]), None)


def nanogpt_sample_py_load(path):
  """What nanoGPT's sample.py does with --init_from=resume."""
  checkpoint = torch.load(path, map_location='cpu')
  model = NanoGPT(GPTConfig(**checkpoint['model_args']))
  state_dict = checkpoint['model']
  unwanted_prefix = '_orig_mod.'
  for k in list(state_dict):
    if k.startswith(unwanted_prefix):
      state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
  model.load_state_dict(state_dict)
  return model.eval(), checkpoint


@pytest.mark.parametrize('bias', [True, False])
def test_nanogpt_export_loads_in_nanogpt(bias, tmp_path):
  c, path = dataclasses.replace(FAMILIES['gpt2'], bias=bias), str(tmp_path / 'ckpt.pt')
  flat, tok = random_flat(c), tokens(c)
  nanogpt.save_nanogpt(path, c, flat, TOK, {'step': 250, 'val_loss': 1.25})
  model, ck = nanogpt_sample_py_load(path)
  assert ck['model_args'] == {'n_layer': 2, 'n_head': 4, 'n_embd': 32, 'block_size': 80, 'bias': bias,
                              'vocab_size': 97, 'dropout': 0.0}
  assert ck['iter_num'] == 250 and ck['best_val_loss'] == 1.25
  lj = jax_logits(c, flat, tok)
  with torch.no_grad():
    full = model(torch.tensor(tok), targets=torch.tensor(tok))[0].numpy()
    last = model(torch.tensor(tok))[0].numpy()
  assert float(np.abs(full - lj).max()) <= 1e-4 and float(np.abs(last[:, 0] - lj[:, -1]).max()) <= 1e-4
  imp = formats.load_any(path)  # and back, bit-exact, with our block_size and tokenizer
  assert imp.fmt == 'nanogpt' and imp.model_config == c and imp.tokenizer_json == TOK
  assert imp.meta['step'] == 250 and imp.meta['val_loss'] == 1.25
  assert_flat_equal(imp.flat, flat)


def test_nanogpt_compiled_checkpoint_imports(tmp_path):
  torch.manual_seed(0)
  nc = GPTConfig(block_size=24, vocab_size=61, n_layer=2, n_head=2, n_embd=16, bias=True)
  model = NanoGPT(nc).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.3)
  sd = {'_orig_mod.' + k: v for k, v in model.state_dict().items()}  # what torch.compile'd training saves
  path = str(tmp_path / 'ckpt.pt')
  torch.save({'model': sd, 'optimizer': {}, 'model_args': dataclasses.asdict(nc), 'iter_num': 4000,
              'best_val_loss': 1.47, 'config': {'dataset': 'shakespeare_char', 'batch_size': 64}}, path)
  assert formats.detect(path) == 'nanogpt' and formats.detect(str(tmp_path)) == 'nanogpt'
  imp = formats.load_any(str(tmp_path))  # the out_dir works too
  c = imp.model_config
  assert (c.pos, c.norm, c.mlp, c.bias, c.tie_embeddings, c.d_ff, c.max_positions) == \
      ('learned', 'layernorm', 'gelu', True, True, 64, 24)
  assert imp.meta['step'] == 4000 and imp.meta['nanogpt_config']['dataset'] == 'shakespeare_char'
  tok = tokens(c, T=24)
  with torch.no_grad():
    want = model(torch.tensor(tok), targets=torch.tensor(tok))[0].numpy()
  assert float(np.abs(jax_logits(c, imp.flat, tok) - want).max()) <= 1e-4


def test_nanogpt_refuses_what_it_lacks(tmp_path):
  with pytest.raises(UserError, match=r'nanoGPT cannot represent this model: pos=rope .*d_ff=96 .*'
                                      r'tie_embeddings=False'):
    nanogpt.save_nanogpt(str(tmp_path / 'x.pt'), FAMILIES['tiny'], random_flat(FAMILIES['tiny']), None, {})
  c = dataclasses.replace(FAMILIES['gpt2'], norm_eps=1e-6)
  with pytest.raises(UserError, match=r'norm_eps=1e-06 \(nanoGPT fixes 1e-5\)'):
    nanogpt.save_nanogpt(str(tmp_path / 'x.pt'), c, random_flat(c), None, {})
  assert not os.path.exists(tmp_path / 'x.pt')


# ------------------------------------------------------------------------------------------- Hugging Face

CLASS_OF = {'gpt2': 'GPT2LMHeadModel', 'tiny': 'GPTNeoXForCausalLM', 'llama': 'LlamaForCausalLM',
            'gpt2_nobias_untied': 'GPT2LMHeadModel', 'llama_bias_untied': 'LlamaForCausalLM',
            'neox_bias_tied': 'GPTNeoXForCausalLM'}


@pytest.mark.parametrize('fam', ALL_HF)
def test_hf_round_trip_bit_exact(fam, tmp_path):
  c, d = ALL_HF[fam], str(tmp_path / 'hf')
  flat = random_flat(c)
  hf.save_hf(d, c, flat, TOK, {'step': 9, 'config': {'model': {'n_layer': 2}}})
  assert sorted(os.listdir(d)) == ['config.json', 'model.safetensors', 'tokenizer.json',
                                   'tokenizer_config.json']
  modes = {n: os.stat(os.path.join(d, n)).st_mode & 0o777 for n in os.listdir(d)}
  assert len(set(modes.values())) == 1, modes  # the weights as readable as the rest (safetensors wrote 0600)
  assert formats.detect(d) == 'hf'
  imp = formats.load_any(d)
  assert imp.model_config == c and imp.tokenizer_json == TOK and imp.meta['step'] == 9
  assert imp.cfg_plain == {'model': {'n_layer': 2}}
  assert_flat_equal(imp.flat, flat)


@pytest.mark.parametrize('fam', ALL_HF)
def test_transformers_loads_hf_export_with_same_logits(fam, tmp_path):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  c, d = ALL_HF[fam], str(tmp_path / 'hf')
  flat, tok = random_flat(c), tokens(c)
  hf.save_hf(d, c, flat, TOK, {})
  m, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
  assert type(m).__name__ == CLASS_OF[fam]
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  assert m.config.eos_token_id == 3
  t = AutoTokenizer.from_pretrained(d)
  assert t.eos_token == '<|endoftext|>' and t('w5 w7 <|endoftext|>')['input_ids'] == [5, 7, 3]
  with torch.no_grad():
    lh = m.eval()(torch.tensor(tok)).logits.numpy()
    gen = m.generate(torch.tensor(tok[:, :5]), max_new_tokens=20, do_sample=False, pad_token_id=0).numpy()
  diff = float(np.abs(lh - jax_logits(c, flat, tok)).max())
  print(f'{fam}: max |flax - transformers {CLASS_OF[fam]}| = {diff:.2e}')
  assert diff <= 1e-4
  np.testing.assert_array_equal(gen, mirror(c, flat).generate(torch.tensor(tok[:, :5]), 20).numpy())


@pytest.mark.parametrize('change, match', [
    ({'pos': 'rope', 'norm': 'rmsnorm'}, r'Llama lacks a non-gated GELU MLP, GPT-NeoX lacks RMSNorm'),
    ({'pos': 'rope', 'n_kv_head': 2}, r'GPT-NeoX lacks grouped-query attention \(n_kv_head=2 < n_head=4\)'),
    ({'pos': 'rope', 'mlp': 'swiglu'}, r'Llama lacks LayerNorm, GPT-NeoX lacks SwiGLU MLPs'),
    ({'norm': 'rmsnorm'}, r'GPT-2 \(the learned-position class\) lacks RMSNorm'),
])
def test_hf_export_refuses_inexact(change, match, tmp_path):
  c = dataclasses.replace(BASE, **change)
  with pytest.raises(UserError, match=match):
    hf.save_hf(str(tmp_path / 'hf'), c, random_flat(c), None, {})
  assert not os.path.exists(tmp_path / 'hf')


def _randomized(model):
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      norm = 'norm' in name or '.ln_' in name
      p.copy_(1 + 0.1 * torch.randn_like(p) if norm else 0.3 * torch.randn_like(p))
  return model.eval()


def _foreign(kind, tmp_path, **kw):
  """A directory written by transformers itself (no minillm entry in config.json), random weights."""
  import transformers as tf
  common = {'vocab_size': 61, 'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 4,
            'max_position_embeddings': 32}
  if kind == 'gpt2':
    cfg = tf.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=None,
                        eos_token_id=None, activation_function='gelu', tie_word_embeddings=False)
    cls = tf.GPT2LMHeadModel
  elif kind == 'llama':  # GQA, q/k/v/o biases but no MLP biases, tied
    cls, cfg = tf.LlamaForCausalLM, tf.LlamaConfig(**common, intermediate_size=48, num_key_value_heads=2,
                                                   attention_bias=True, mlp_bias=False, rope_theta=1000.0,
                                                   tie_word_embeddings=True)
  else:  # attention without biases, MLP and LayerNorms with them, untied (saved as embed_out)
    cls, cfg = tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**common, intermediate_size=64, rotary_pct=1.0,
                                                       use_parallel_residual=False, attention_bias=False,
                                                       tie_word_embeddings=False)
  for k, v in kw.items():
    setattr(cfg, k, v)
  model = _randomized(cls(cfg))
  d = str(tmp_path / kind)
  model.save_pretrained(d)
  return model, d


@pytest.mark.parametrize('kind', ['gpt2', 'llama', 'neox'])
def test_import_transformers_written_dirs(kind, tmp_path):
  model, d = _foreign(kind, tmp_path)
  imp = formats.load_any(d)
  c = imp.model_config
  assert imp.fmt == f'hf-{kind}' and c.vocab_size == 61 and c.n_layer == 2 and c.bias
  tok = tokens(c, T=16)
  with torch.no_grad():
    want = model(torch.tensor(tok)).logits.numpy()
  assert float(np.abs(jax_logits(c, imp.flat, tok) - want).max()) <= 1e-4
  hf.save_hf(str(tmp_path / 'again'), c, imp.flat, None, {})  # and it exports back to the same class
  again = json.loads((tmp_path / 'again' / 'config.json').read_text())
  assert again['architectures'] == [type(model).__name__]


def test_import_sharded_safetensors_and_legacy_bin(tmp_path):
  model, d = _foreign('gpt2', tmp_path)
  want = formats.load_any(d).flat
  sharded = str(tmp_path / 'sharded')
  model.save_pretrained(sharded, max_shard_size='20KB')
  assert os.path.isfile(os.path.join(sharded, 'model.safetensors.index.json'))
  legacy = tmp_path / 'legacy'  # the original OpenAI GPT-2 layout: no 'transformer.' prefix, mask buffers
  legacy.mkdir()
  sd = {k.removeprefix('transformer.'): v for k, v in model.state_dict().items()}
  sd.update({f'h.{i}.attn.bias': torch.tril(torch.ones(1, 1, 32, 32)) for i in range(2)})
  torch.save(sd, legacy / 'pytorch_model.bin')
  (legacy / 'config.json').write_text((tmp_path / 'gpt2' / 'config.json').read_text())
  for src in (sharded, str(legacy)):
    assert_flat_equal(formats.load_any(src).flat, want)


def test_import_refuses_what_minillm_cannot_compute(tmp_path):
  _, d = _foreign('gpt2', tmp_path, activation_function='gelu_new')
  with pytest.raises(UserError, match=r"activation 'gelu_new' is an approximate GELU .*--allow_inexact"):
    formats.load_any(d)
  imp = formats.load_any(d, allow_inexact=True)
  assert imp.notes and 'gelu_new' in imp.notes[0]
  _, d = _foreign('neox', tmp_path, use_parallel_residual=True)
  with pytest.raises(UserError, match=r'use_parallel_residual=True .*cannot compute this model exactly'):
    formats.load_any(d)
