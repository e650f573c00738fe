"""Character-level Shakespeare: the classic quick CPU config (nanoGPT's shakespeare_char CPU settings)."""
from minillm_jax.config import default_config, no_variant


def get_config(variant: str = ''):
  no_variant(variant)
  c = default_config()
  c.model.update(n_layer=4, n_head=4, d_model=128, block_size=64, pos='learned', norm='layernorm', mlp='gelu',
                 bias=False, tie_embeddings=True, dropout=0.0)
  c.data.update(corpus='shakespeare', tokenizer='char', val_fraction=0.1)
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0)
  c.train.update(steps=2000, batch_size=12, eval_every=250, eval_batches=20, ckpt_every=500, seed=1337)
  c.sample.update(temperature=0.8, top_k=200, max_new_tokens=500, prompt='\n')
  return c
