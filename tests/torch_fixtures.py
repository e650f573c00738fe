"""Shared pieces of the torch_compat tests: small configs of each family, a word tokenizer, random weights at a
scale without near-ties, and comparisons."""
import dataclasses

import jax.numpy as jnp
import numpy as np

from minillm_jax.config import ModelConfig
from torch_compat import convert
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
ALL_HF = {**FAMILIES, **HF_VARIANTS}
