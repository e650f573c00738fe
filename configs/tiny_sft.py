"""tiny_sft: instruction fine-tuning of a pretrained `tiny` run on python_instruct (the embedded, offline
instruction set made from the standard library), with the loss on the assistant replies only.

  python -m minillm_jax.train --config=configs/tiny.py --workdir=runs/tiny                 # pretrain
  python -m minillm_jax.train --config=configs/tiny_sft.py --workdir=runs/tiny_sft          # fine-tune
  python -m minillm_jax.chat --workdir=runs/tiny_sft                                         # chat template

Variant `tiny_sft.py:mini` fine-tunes `runs/tiny_mini` (configs/tiny.py:mini) at block 512 where it was
pretrained at 256: RoPE has no position weights, so the block may grow. Lower learning rate than pretraining, a
short schedule, early stopping on the assistant-token validation loss."""
from minillm_jax.config import preset_beside


def get_config(variant: str = ''):
  c = preset_beside(__file__, 'tiny', variant)
  c.data.update(corpus='python_instruct', format='chat')
  c.optim.update(lr=c.optim.lr / 3, min_lr=c.optim.min_lr / 3, warmup_steps=20)
  c.train.update(init_from='runs/tiny', steps=400, eval_every=50, ckpt_every=50, eval_batches=8, patience=3)
  c.sample.update(prompt='', temperature=0.7, top_k=50)
  if variant == 'mini':
    c.model.block_size = 512
    c.train.update(init_from='runs/tiny_mini', steps=200, batch_size=8, eval_every=25, ckpt_every=25)
  return c
