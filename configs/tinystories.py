"""tinystories: the basic10m model (GPT-2 style, 8 layers, 256 d, block 512) on TinyStories
(roneneldan/TinyStories, 2.1M short stories), with GPT-2's BPE and the dataset's own validation split.

  python -m minillm_jax.train --config=configs/tinystories.py --workdir=runs/tinystories        # GPT-2 BPE
  python -m minillm_jax.train --config=configs/tinystories.py:char --workdir=runs/tinystories_c  # characters

Needs the network for the download (about 1 GB of Parquet into ~/.cache/huggingface) and, for `data.tokenizer=gpt2`,
GPT-2's tokenizer once (README, "Recipes"). With GPT-2's 50,257-token vocabulary the embedding adds 12.9M
parameters to the body's 6.3M (19.3M in all); variant `:char` has about 6.5M."""
from minillm_jax.config import ConfigError, preset_beside


def get_config(variant: str = ''):
  if variant not in ('', 'char'):
    raise ConfigError(f'unknown variant {variant!r} of tinystories.py: use tinystories.py or tinystories.py:char')
  c = preset_beside(__file__, 'basic10m')
  c.data.update(corpus='hub', hub_name='roneneldan/TinyStories', hub_split='train', hub_val_split='auto',
                text_field='text', tokenizer='gpt2', vocab_size=None)
  c.model.update(vocab_size=50257, dropout=0.0)
  c.train.update(steps=10000, batch_size=32, eval_every=500, eval_batches=20, ckpt_every=1000)
  c.sample.update(prompt='Once upon a time', max_new_tokens=200, temperature=0.8, top_k=50)
  if variant == 'char':
    c.data.update(tokenizer='char')
    c.model.update(vocab_size=None, block_size=512)
  return c
