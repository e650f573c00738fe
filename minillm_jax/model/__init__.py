"""The model layer: the architecture (gpt), its custom-derivative ops (ops) and attention (attention)."""
from minillm_jax.model.gpt import DTYPES, GPT, Cache, decode_bytes, flops_per_token, init_model, param_counts
from minillm_jax.model.ops import mm, project

__all__ = ['DTYPES', 'GPT', 'Cache', 'decode_bytes', 'flops_per_token', 'init_model', 'mm', 'param_counts',
           'project']
