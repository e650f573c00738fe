"""`python -m minillm_jax.model --config=configs/tiny.py`: a preset's parameter count, FLOPs per token and shape."""
from __future__ import annotations

from minillm_jax import cli
from minillm_jax.model.gpt import flops_per_token, param_counts


def _main(argv):
  del argv
  cfg = cli.config()
  note = ''
  if cfg.model.vocab_size is None and cfg.data.vocab_size is None:
    note = ' (vocab_size comes from the tokenizer at prepare time; counted here with 91, the characters of the embedded Shakespeare text)'
  c = cli.model_config_or_exit(cfg, 91)
  n, f = param_counts(c), flops_per_token(c)
  print(f'parameters      {n["total"]:,}')
  print(f'non-embedding   {n["non_embedding"]:,}')
  print(f'FLOPs/token     {f["forward"]:,.0f} forward, {f["train"]:,.0f} train (context {c.block_size})')
  print(f'shape           {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads ({c.n_kv_head} kv), d_ff '
        f'{c.d_ff}, vocab {c.vocab_size}, pos {c.pos}, norm {c.norm}, mlp {c.mlp}, bias {c.bias}, '
        f'tied {c.tie_embeddings}{note}')


if __name__ == '__main__':
  cli.define_config(default=None)
  cli.run(_main)
