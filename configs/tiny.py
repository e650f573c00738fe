"""tiny: RoPE, GELU MLP 2048, no biases, weight-only LayerNorms, untied head, 6 layers, 512 d, 8 heads, BPE 8000,
block 1024: exactly 27,073,024 parameters. Trained on the mixed code+books corpus.

Variant `tiny.py:mini`: the same recipe at 4 layers, 256 d, block 256 (7.3M parameters, 16 x 256 tokens a step),
the base model of the quick pretrain -> fine-tune -> chat pipeline (configs/tiny_sft.py:mini), sized for a CPU."""
from minillm_jax.config import ConfigError, default_config


def get_config(variant: str = ''):
  if variant not in ('', 'mini'):
    raise ConfigError(f'unknown variant {variant!r} of tiny.py: use tiny.py or tiny.py:mini')
  c = default_config()
  c.model.update(n_layer=6, n_head=8, d_model=512, d_ff=2048, vocab_size=8000, block_size=1024, pos='rope',
                 norm='layernorm', mlp='gelu', bias=False, tie_embeddings=False, dropout=0.0)
  c.data.update(corpus='mixed', tokenizer='bpe', vocab_size=8000, code_weight=3.0)
  c.optim.update(lr=6e-4, min_lr=6e-5, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.95)
  c.train.update(steps=2000, batch_size=8, eval_every=200, eval_batches=10, ckpt_every=200)
  c.sample.update(prompt='def quick_sort(collection):', max_new_tokens=200, top_k=50, temperature=0.8)
  if variant == 'mini':
    c.model.update(n_layer=4, n_head=4, d_model=256, d_ff=1024, block_size=256)
    c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=50)
    c.train.update(steps=600, batch_size=16, eval_every=100, eval_batches=10, ckpt_every=100)
  return c
