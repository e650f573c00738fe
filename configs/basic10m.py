"""basic10m: GPT-2 style, 8 layers, 8 heads, 256 d, FFN 1024, block 512, BPE 8000: ~6.3M parameters without
embeddings (8.4M with them)."""
from minillm_jax.config import default_config, no_variant


def get_config(variant: str = ''):
  no_variant(variant)
  c = default_config()
  c.model.update(n_layer=8, n_head=8, d_model=256, d_ff=1024, vocab_size=8000, block_size=512, pos='learned',
                 norm='layernorm', mlp='gelu', bias=True, tie_embeddings=True, dropout=0.1)
  c.data.update(corpus='mixed', tokenizer='bpe', vocab_size=8000)
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=200, weight_decay=0.1, b1=0.9, b2=0.95)
  c.train.update(steps=5000, batch_size=16, eval_every=250, eval_batches=20, ckpt_every=500)
  return c
