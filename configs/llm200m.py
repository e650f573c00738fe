"""llm200m: Llama style (RoPE, SwiGLU 3072, RMSNorm, no biases), 24 layers, 768 d, 12 heads, vocab 32000, tied
embeddings, block 1024: ~251M parameters. Sized for a GPU; on CPU use it only to check shapes."""
from minillm_jax.config import default_config, no_variant


def get_config(variant: str = ''):
  no_variant(variant)
  c = default_config()
  c.model.update(n_layer=24, n_head=12, d_model=768, d_ff=3072, vocab_size=32000, block_size=1024, pos='rope',
                 rope_theta=10000.0, norm='rmsnorm', mlp='swiglu', bias=False, tie_embeddings=True, dropout=0.0,
                 dtype='bfloat16')
  c.data.update(corpus='mixed', tokenizer='bpe', vocab_size=32000)
  c.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=1000, weight_decay=0.1, b1=0.9, b2=0.95, accum_steps=4)
  c.train.update(steps=20000, batch_size=16, eval_every=500, eval_batches=20, ckpt_every=1000)
  return c
