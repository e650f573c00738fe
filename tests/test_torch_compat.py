"""torch_compat: the torch mirror against the Flax model, the one conversion table, every format both ways,
and the Hugging Face exports loaded by transformers itself. Tiny models, CPU, offline."""
import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_module
from flax import nnx
from torch import nn

from minillm_jax.config import ModelConfig, UserError
from torch_compat import convert, formats, hf, nanogpt, pt
from torch_compat import model as tmodel

BASE = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=128, block_size=64,
                   max_positions=80)
FAMILIES = {
    'gpt2': dataclasses.replace(BASE, bias=True),  # learned, LayerNorm with bias, GELU 4x, tied
    'tiny': dataclasses.replace(BASE, d_ff=96, pos='rope', tie_embeddings=False),  # like the tiny preset
    'llama': dataclasses.replace(BASE, n_kv_head=2, d_ff=64, pos='rope', rope_theta=500.0, norm='rmsnorm',
                                 norm_eps=1e-6, mlp='swiglu'),  # + GQA, tied
}
HF_VARIANTS = {  # the other bias/tie corners of each HF class
    'gpt2_nobias_untied': dataclasses.replace(FAMILIES['gpt2'], bias=False, tie_embeddings=False,
                                              norm_eps=1e-6),
    'llama_bias_untied': dataclasses.replace(FAMILIES['llama'], bias=True, tie_embeddings=False, n_kv_head=4),
    'neox_bias_tied': dataclasses.replace(FAMILIES['tiny'], bias=True, tie_embeddings=True),
}


def word_tokenizer() -> str:
  """A real tokenizer.json: words w0..w96 with id 3 as <|endoftext|>."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {('<|endoftext|>' if i == 3 else f'w{i}'): i for i in range(97)}
  tk = Tokenizer(models.WordLevel(vocab, unk_token='w0'))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tk.add_special_tokens(['<|endoftext|>'])
  return tk.to_str()


TOK = word_tokenizer()


def random_flat(c: ModelConfig, seed: int = 0) -> dict:
  """Random parameters at a scale that separates the logits (so greedy decoding has no near-ties)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in convert.flax_shapes(c).items():
    base = 1.0 if name.endswith('scale') else 0.0
    std = 0.1 if base or name.endswith('bias') else 0.3
    out[name] = (base + rng.normal(0, std, shape)).astype(np.float32)
  return out


def tokens(c, B=2, T=20, seed=1):
  return np.random.default_rng(seed).integers(0, c.vocab_size, (B, T))


def jax_logits(c, flat, tok):
  return np.asarray(convert.load_into_flax(c, flat)(jnp.asarray(tok)))


def mirror(c, flat):
  m = tmodel.GPT(c.to_dict())
  m.load_state_dict(convert.flax_to_torch(c, flat, 'pt'))
  return m.eval()


def assert_flat_equal(a: dict, b: dict):
  assert set(a) == set(b)
  for k, v in a.items():
    assert v.dtype == b[k].dtype == np.float32 and np.array_equal(v, b[k]), k


# ------------------------------------------------------------------------------------------------ mirror

@pytest.mark.parametrize('fam', FAMILIES)
def test_mirror_logits_match_flax(fam):
  c = FAMILIES[fam]
  flat, tok = random_flat(c), tokens(c)
  lj = jax_logits(c, flat, tok)
  m = mirror(c, flat)
  with torch.no_grad():
    lt = m(torch.tensor(tok)).numpy()
    cache = m.init_cache(2)  # prefill 7, then one token at a time: the same logits as the full forward
    parts = [m.decode(torch.tensor(tok[:, :7]), cache, 0)[0]]
    parts += [m.decode(torch.tensor(tok[:, t:t + 1]), cache, t)[0] for t in range(7, tok.shape[1])]
  diff = float(np.abs(lj - lt).max())
  print(f'{fam}: max |flax - torch| = {diff:.2e} (logits up to {np.abs(lj).max():.1f})')
  assert lt.dtype == np.float32 and diff <= 1e-4
  assert float(np.abs(torch.cat(parts, 1).numpy() - lt).max()) <= 1e-5


def jax_greedy(c, flat, prompt, n):
  """Greedy decoding with the Flax model's KV cache: prefill, then one token per jitted step."""
  model = convert.load_into_flax(c, flat)
  gdef, state = nnx.split(model)

  @jax.jit
  def step(state, tok, cache, pos):
    logits, cache = nnx.merge(gdef, state).decode(tok, cache, pos)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  B, T = prompt.shape
  nxt, cache = step(state, jnp.asarray(prompt), model.init_cache(B, T + n), 0)
  out = [nxt]
  for i in range(n - 1):
    nxt, cache = step(state, nxt[:, None], cache, T + i)
    out.append(nxt)
  return np.concatenate([prompt, np.stack(out, 1)], 1)


@pytest.mark.parametrize('fam', FAMILIES)
def test_greedy_generation_identical(fam):
  c = FAMILIES[fam]
  flat, prompt = random_flat(c, seed=3), tokens(c, T=5, seed=4)
  want = jax_greedy(c, flat, prompt, 64)
  got = mirror(c, flat).generate(torch.tensor(prompt), 64).numpy()
  assert got.shape == (2, 69)
  np.testing.assert_array_equal(got, want)
  assert len(set(want[0, 5:].tolist())) > 3  # not a degenerate repeat of one token


def test_mirror_imports_no_jax_and_picks_device(tmp_path):
  c = FAMILIES['llama']
  pt.save_pt(str(tmp_path / 'm.pt'), c, random_flat(c), TOK, {'step': 7})
  code = ('import sys; sys.modules["jax"] = None; sys.modules["flax"] = None\n'
          'import torch; from torch_compat import model as M\n'
          f'm, tok, meta = M.load({str(tmp_path / "m.pt")!r}, device="cpu")\n'
          'out = m.generate(torch.tensor([[1, 2]]), 3)\n'
          'print(meta["step"], len(tok) > 0, out.shape[1], M.pick_device())')
  import subprocess
  import sys
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     check=False)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ['7', 'True', '5', 'cpu']


# ---------------------------------------------------------------------------------------------- native .pt

@pytest.mark.parametrize('fam', FAMILIES)
def test_pt_round_trip_bit_exact(fam, tmp_path):
  c, path = FAMILIES[fam], str(tmp_path / 'model.pt')
  flat = random_flat(c)
  meta = {'step': 5, 'val_loss': np.float32(1.5), 'config': {'train': {'steps': 9}}, 'tokenizer': 'dropped',
          'model_config': 'dropped'}
  pt.save_pt(path, c, flat, TOK, meta)
  raw = torch.load(path, weights_only=True)
  assert set(raw) == {'model', 'model_config', 'tokenizer', 'meta'} and raw['model_config'] == c.to_dict()
  assert raw['meta'] == {'step': 5, 'val_loss': 1.5, 'config': {'train': {'steps': 9}}}
  imp = formats.load_any(path)
  assert imp.fmt == 'pt' and imp.model_config == c and imp.tokenizer_json == TOK
  assert imp.cfg_plain == {'train': {'steps': 9}}
  assert_flat_equal(imp.flat, flat)


class NotPlain:  # any class: torch.load(weights_only=True) must not unpickle it
  def __init__(self):
    self.x = 1


def test_pt_with_pickled_object_is_refused(tmp_path):
  path = str(tmp_path / 'evil.pt')
  torch.save({'model': {}, 'model_config': BASE.to_dict(), 'meta': NotPlain()}, path)
  with pytest.raises(UserError, match=r'refusing to load .*evil\.pt: it holds pickled objects other than '):
    formats.load_any(path)
  with pytest.raises(UserError, match='only plain data'):
    pt.save_pt(str(tmp_path / 'x.pt'), BASE, random_flat(BASE), None, {'obj': NotPlain()})


def test_corrupt_pt_is_named_as_such_not_as_unsafe(tmp_path):
  good = str(tmp_path / 'good.pt')
  pt.save_pt(good, BASE, random_flat(BASE), None, {})
  data = pathlib.Path(good).read_bytes()
  cases = {'text.pt': b'not a checkpoint\n', 'truncated.pt': data[:len(data) // 2], 'empty.pt': b''}
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf'{name} is not a readable torch checkpoint') as e:
      formats.load_any(str(path))
    assert '\n' not in str(e.value) and len(str(e.value)) < 300 and 'could run code' not in str(e.value)


def test_wrong_shapes_and_names_are_named(tmp_path):
  c = FAMILIES['tiny']
  sd = convert.flax_to_torch(c, random_flat(c), 'pt')
  bad = dict(sd, **{'transformer.h.1.attn.c_attn.weight': torch.zeros(96, 16)})
  with pytest.raises(UserError, match=r'tensor transformer\.h\.1\.attn\.c_attn\.weight: expected shape '
                                      r'\(96, 32\), found \(96, 16\)'):
    convert.torch_to_flax(c, bad, 'pt')
  missing = {k: v for k, v in sd.items() if k != 'lm_head.weight'}
  with pytest.raises(UserError, match=r'lacks tensor lm_head\.weight \(expected shape \(97, 32\)\)'):
    convert.torch_to_flax(c, missing, 'pt')
  with pytest.raises(UserError, match=r'unexpected tensors \[.transformer\.h\.0\.ln_1\.bias.\]'):
    convert.torch_to_flax(c, dict(sd, **{'transformer.h.0.ln_1.bias': torch.zeros(32)}), 'pt')
  flat = random_flat(c)
  flat['wte'] = flat['wte'][:50]
  with pytest.raises(UserError, match=r'parameter wte: expected shape \(97, 32\) .*found \(50, 32\)'):
    convert.load_into_flax(c, flat)
  path = str(tmp_path / 'bad.pt')
  torch.save({'model': bad, 'model_config': c.to_dict(), 'tokenizer': '', 'meta': {}}, path)
  with pytest.raises(UserError, match=r'c_attn\.weight: expected shape \(96, 32\), found \(96, 16\)'):
    formats.load_any(path)


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

ALL_HF = {**FAMILIES, **HF_VARIANTS}
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


# ---------------------------------------------------------------------------------------------------- CLIs

def test_cli_export_import_round_trip(tmp_path):
  from minillm_jax.training import checkpoint
  from torch_compat.export import export
  from torch_compat.import_ckpt import import_ckpt
  c = FAMILIES['tiny']
  flat = random_flat(c)
  src = str(tmp_path / 'run')
  checkpoint.init_workdir(src, None, c, convert.load_into_flax(c, flat), TOK, {})
  for fmt, out in (('pt', 'm.pt'), ('hf', 'hf_dir')):
    msg = export(src, str(tmp_path / out), fmt, 'latest')
    assert msg.startswith(f'wrote {tmp_path / out}')
    assert 'GPTNeoXForCausalLM' in msg or fmt == 'pt'
    dst = str(tmp_path / f'imported_{fmt}')
    assert 'with tokenizer' in import_ckpt(str(tmp_path / out), dst)
    mc, model, tok, meta = checkpoint.load_for_inference(dst, 'latest')
    assert mc == c and tok == TOK and meta['source_format'] in ('pt', 'hf-neox')
    assert_flat_equal(convert.flax_flat(model), flat)
  r = run_module('torch_compat.export', f'--workdir={src}', f'--out={tmp_path / "n.pt"}', '--format=nanogpt')
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: nanoGPT cannot represent')
  r = run_module('torch_compat.import_ckpt', f'--src={tmp_path / "nope.pt"}', f'--workdir={tmp_path / "x"}')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == f'error: --src={tmp_path / "nope.pt"} does not exist'
  # nothing of an existing run is overwritten: not by an hf export into it, not by an import into it
  run_files = {n: pathlib.Path(src, n).read_text() for n in ('config.json', 'config.py')}
  with pytest.raises(UserError, match=r'already holds other files \(checkpoints, config.py'):
    export(src, src, 'hf', 'latest')
  export(src, str(tmp_path / 'hf_dir'), 'hf', 'latest')  # a previous export's directory may be rewritten
  with pytest.raises(UserError, match=r'is a directory; this format writes a file'):
    export(src, str(tmp_path / 'hf_dir'), 'pt', 'latest')
  for fmt, victim in (('pt', 'config.json'), ('pt', 'config.py'), ('pt', 'hf_dir/config.json')):
    path = tmp_path / victim if victim.startswith('hf_dir') else pathlib.Path(src, victim)
    before = path.read_bytes()
    with pytest.raises(UserError, match=r'exists and is not a torch checkpoint; refusing to overwrite it'):
      export(src, str(path), fmt, 'latest')
    assert path.read_bytes() == before
  export(src, str(tmp_path / 'm.pt'), 'pt', 'latest')  # an earlier torch export may be replaced
  os.makedirs(tmp_path / 'other' / 'checkpoints')
  (tmp_path / 'other' / 'metrics.jsonl').write_text('{"step": 5}\n')
  with pytest.raises(UserError, match=r"already holds files \(metrics.jsonl\); import into a new"):
    import_ckpt(str(tmp_path / 'm.pt'), str(tmp_path / 'other'))
  assert {n: pathlib.Path(src, n).read_text() for n in run_files} == run_files
  assert (tmp_path / 'other' / 'metrics.jsonl').read_text() == '{"step": 5}\n'
  half = tmp_path / 'half'  # what an import killed during its checkpoint save leaves: it can be run again
  os.makedirs(half / 'checkpoints' / '0.orbax-checkpoint-tmp' / 'params.orbax-checkpoint-tmp')
  (half / 'config.json').write_text('{}')
  import_ckpt(str(tmp_path / 'm.pt'), str(half))
  assert_flat_equal(convert.flax_flat(checkpoint.load_for_inference(str(half), 'latest')[1]), flat)
  assert os.listdir(half / 'checkpoints') == ['0']


def test_one_table_covers_every_layout():
  """For every config and layout, flax_to_torch writes exactly the tensors torch_shapes predicts (zero biases
  and nanoGPT's tied head included), and the table's names are the ones the classes use."""
  for c in {**ALL_HF, 'llama_gqa_bias': dataclasses.replace(FAMILIES['llama'], bias=True)}.values():
    flat = random_flat(c)
    fmts = ('pt', hf.arch_for(c)) + (('nanogpt',) if not nanogpt.nanogpt_problems(c) else ())
    for fmt in fmts:
      sd = convert.flax_to_torch(c, flat, fmt)
      assert {k: tuple(v.shape) for k, v in sd.items()} == convert.torch_shapes(c, fmt) | (
          {'lm_head.weight': (c.vocab_size, c.d_model)} if fmt == 'nanogpt' else {})
      assert_flat_equal(convert.torch_to_flax(c, sd, fmt), flat)
  assert convert.torch_names('llama', 'blocks.3.attn.qkv.kernel') == tuple(
      f'model.layers.3.self_attn.{p}_proj.weight' for p in 'qkv')
  assert convert.torch_names('neox', 'head.kernel') == ('embed_out.weight',)


def test_corrupt_hf_directory_is_named(tmp_path):
  c = FAMILIES['gpt2']
  d = str(tmp_path / 'hf')
  hf.save_hf(d, c, random_flat(c), TOK, {})
  st = os.path.join(d, 'model.safetensors')
  data = pathlib.Path(st).read_bytes()
  pathlib.Path(st).write_bytes(data[:len(data) // 3])
  with pytest.raises(UserError, match=r'model\.safetensors is not a readable safetensors file'):
    formats.load_any(d)
  os.remove(st)
  with open(st + '.index.json', 'w') as f:
    json.dump({'weight_map': {'lm_head.weight': 'model-00001-of-00002.safetensors'}}, f)
  with pytest.raises(UserError, match=r'model-00001-of-00002\.safetensors does not exist'):
    formats.load_any(d)
  with open(st + '.index.json', 'w') as f:
    f.write('{"weight_map": ')
  with pytest.raises(UserError, match=r'cannot read .*index\.json'):
    formats.load_any(d)


@pytest.mark.parametrize('change,match', [
    ({'n_layer': '4'}, r"model\.n_layer='4' has type str"),
    ({'n_head': 0}, r'model\.n_head=0 must be a positive integer'),
    ({'block_size': 128, 'max_positions': 64}, r'model\.block_size=128 exceeds model\.max_positions=64'),
    ({'dtype': 'float16'}, r"model\.dtype='float16' is not one of")])
def test_model_config_values_in_a_pt_are_checked(change, match, tmp_path):
  path = str(tmp_path / 'm.pt')
  pt.save_pt(path, BASE, random_flat(BASE), None, {})
  ckpt = torch.load(path, weights_only=True)
  ckpt['model_config'].update(change)
  torch.save(ckpt, path)
  with pytest.raises(UserError, match=rf'm\.pt: bad model_config: {match}'):
    formats.load_any(path)


def test_malformed_hf_config_values_are_one_line_errors(tmp_path):
  c = FAMILIES['llama']
  d = str(tmp_path / 'hf')
  hf.save_hf(d, c, random_flat(c), TOK, {})
  cfg_path = os.path.join(d, 'config.json')
  j = json.loads(pathlib.Path(cfg_path).read_text())
  del j['minillm']  # read as a foreign Llama config
  for change, match in (({'rope_scaling': 'linear'}, r'unexpected type or form \(AttributeError'),
                        ({'num_hidden_layers': '2'}, r"model\.n_layer='2' has type str"),
                        ({'rms_norm_eps': None}, r'unexpected type or form \(TypeError')):
    pathlib.Path(cfg_path).write_text(json.dumps({**j, **change}))
    with pytest.raises(UserError, match=match):
      formats.load_any(d)
  pathlib.Path(cfg_path).write_text(json.dumps([j]))
  with pytest.raises(UserError, match=r'config\.json holds a list, not a Hugging Face config object'):
    formats.load_any(d)
