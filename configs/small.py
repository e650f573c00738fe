"""small: GPT-2 style, 512 d, 8 layers, 8 heads, vocab 50257, block 1024: ~51.5M parameters."""
from minillm_jax.config import default_config, no_variant


def get_config(variant: str = ''):
  no_variant(variant)
  c = default_config()
  c.model.update(n_layer=8, n_head=8, d_model=512, vocab_size=50257, block_size=1024, pos='learned',
                 norm='layernorm', mlp='gelu', bias=True, tie_embeddings=True, dropout=0.0)
  c.data.update(corpus='mixed', tokenizer='bpe', vocab_size=50257)
  c.optim.update(lr=6e-4, min_lr=6e-5, warmup_steps=200, weight_decay=0.1, b1=0.9, b2=0.95)
  c.train.update(steps=5000, batch_size=8, eval_every=250, eval_batches=20, ckpt_every=500)
  return c
