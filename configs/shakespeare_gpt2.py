"""shakespeare_gpt2: the complete works with GPT-2's BPE (nanoGPT's `shakespeare` dataset), for the GPT-2-style
nano, micro and small models. Their nanoGPT export decodes with nanoGPT's `sample.py` as it is: GPT-2's
encoding is its default.

  python -m minillm_jax.train --config=configs/shakespeare_gpt2.py --workdir=runs/sgpt2          # nano
  python -m minillm_jax.train --config=configs/shakespeare_gpt2.py:micro --workdir=runs/sgpt2_micro
  python -m torch_compat.export --workdir=runs/sgpt2 --format=nanogpt --out=out-shakespeare/ckpt.pt

Needs GPT-2's tokenizer once (the network, or its vocab.json + merges.txt in ~/.cache/minillm_jax/gpt2/)."""
from minillm_jax.config import ConfigError, preset_beside

SIZES = ('nano', 'micro', 'small')


def get_config(variant: str = ''):
  size = variant or 'nano'
  if size not in SIZES:
    raise ConfigError(f'unknown variant {variant!r} of shakespeare_gpt2.py: use one of {", ".join(SIZES)}')
  c = preset_beside(__file__, size)
  c.data.update(corpus='shakespeare', tokenizer='gpt2', vocab_size=None, val_fraction=0.1)
  c.model.update(vocab_size=50257, block_size=256, dropout=0.1)
  c.optim.update(lr=6e-4, min_lr=6e-5, warmup_steps=100)
  c.train.update(steps=3000, batch_size=16, eval_every=250, eval_batches=20, ckpt_every=500)
  c.sample.update(prompt='ROMEO:', max_new_tokens=200, temperature=0.8, top_k=200)
  return c
