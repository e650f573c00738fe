"""The training step as pure functions: the optimizer (AdamW, warmup + cosine, clipping, decay mask), the loss,
gradients (accumulated micro-batches, the flat data-parallel reduction) and `train_steps`, several steps in one
jitted call. minillm_jax.training.loop drives them."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from minillm_jax import parallel


# ----------------------------------------------------------------------------------------------- optimizer
def lr_schedule(o, steps: int) -> optax.Schedule:
  """Linear warmup (from lr/(warmup+1), as nanoGPT, so step 0 is not a no-op) then cosine to min_lr."""
  if o.warmup_steps == 0:
    return optax.cosine_decay_schedule(o.lr, max(steps, 1), alpha=o.min_lr / o.lr)
  return optax.warmup_cosine_decay_schedule(o.lr / (o.warmup_steps + 1), o.lr, o.warmup_steps,
                                            max(steps, o.warmup_steps + 1), o.min_lr)


def decay_mask(params, decay_embeddings: bool):
  """Weight decay on matrices only: never norms or biases; embeddings only when asked."""
  def rule(path, x):
    name = jax.tree_util.keystr(path)
    is_emb = name.startswith(("['wte']", "['wpe']"))
    return x.ndim >= 2 and (decay_embeddings or not is_emb)
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(o, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = lr_schedule(o, steps)
  adamw = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=functools.partial(decay_mask, decay_embeddings=o.decay_embeddings))
  # always the same chain (clip at inf when off) so the optimizer state has one structure for every config
  clip = optax.clip_by_global_norm(o.grad_clip if o.grad_clip > 0 else float('inf'))
  return optax.chain(clip, adamw), sched


def compiler_options(remat: str) -> dict[str, str] | None:
  """XLA options for a jitted step of a model with `model.remat=remat`. jax.checkpoint guards each recomputation
  with an optimization barrier, so that XLA does not merge it back into the forward; XLA:CPU's pipeline expands
  (removes) those barriers before its late CSE pass, which then does exactly that merge, and the step keeps
  every activation as if remat were off (BENCHMARKS.md, "Memory (remat)"). Skipping that one pass keeps the
  barriers; the CPU runtime executes them as no-ops. jax 0.11's XLA:CPU expands them after scheduling instead
  (the option changes nothing there); GPUs and TPUs keep theirs."""
  if remat == 'none' or jax.default_backend() != 'cpu':
    return None
  return {'xla_disable_hlo_passes': 'cse_barrier_expander'}


# ----------------------------------------------------------------------------------------------- steps
# The loss mask. A batch may carry 'mask' [B,T] (or [accum,B,T]) beside 'targets': 1 where the target token
# counts (assistant tokens in fine-tuning), 0 where it does not; float or int, 0/1 values. The loss is then the
# token-weighted mean over the masked-in tokens of the whole step: sum(ce * mask) / sum(mask) across rows,
# accumulated micro-batches and data-parallel devices (not a mean of per-row or per-micro-batch means). Each
# part is divided by the step's total count before it is summed (count / parts per part, then the parts' mean),
# which is the same quotient. A step whose mask is all ones takes the unmasked computation (a lax.cond on the
# whole step's mask), so it is bitwise the plain step: the masked arithmetic alone equals it only to float
# rounding, as XLA:CPU fuses the mask's select into the cross-entropy's backward and can round the loss's last
# bit differently. The price is a second compiled branch in runs that carry a mask (chat fine-tuning). A step
# whose mask is all zero has loss 0 and a zero gradient (the count is taken as 1), never NaN. Masked-out targets
# get exactly zero gradient (their tokens still act as context for later positions). Counts are float32 sums:
# exact below 2**24 masked-in tokens per step. A batch without 'mask' takes the unmasked code path, unchanged
# (the same jaxpr).
def mask_count(mask) -> jax.Array:
  """The number of masked-in tokens (float32), or 1 when there are none, so that 0 / count = 0."""
  c = jnp.sum(mask.astype(jnp.float32))
  return jnp.where(c > 0, c, 1.0)


def loss_fn(params, gdef, inputs_BxT, targets_BxT, key, mask_BxT=None, count=None):
  """Mean cross-entropy over [B,T]; with `mask_BxT`, sum(ce * mask) / `count` (default mask_count(mask))."""
  logits_BxTxV = nnx.merge(gdef, params)(inputs_BxT, key=key)
  if mask_BxT is None:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
  count = mask_count(mask_BxT) if count is None else count
  return jnp.sum(ce_BxT * mask_BxT.astype(ce_BxT.dtype)) / count


def _masked_local_grads(params, gdef, batch: dict, key, count=None) -> tuple[jax.Array, dict]:
  """local_grads of a batch with a 'mask'. `count`: the masked-in tokens this call's loss is normalised by
  (default: the batch's own mask_count; flat_dp_grads passes the global count / devices)."""
  grad_fn = jax.value_and_grad(loss_fn)
  count = mask_count(batch['mask']) if count is None else count
  if batch['inputs'].ndim == 2:
    return grad_fn(params, gdef, batch['inputs'], batch['targets'], key, batch['mask'], count)
  accum = batch['inputs'].shape[0]
  part = count / accum  # with an all-ones mask exactly B*T, the unmasked micro-batch mean's divisor

  def micro(carry, xs):
    i, x, y, m = xs
    l, g = grad_fn(params, gdef, x, y, jax.random.fold_in(key, i), m, part)
    return jax.tree.map(jnp.add, carry, (l, g)), None

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(micro, zero, (jnp.arange(accum), batch['inputs'], batch['targets'],
                                                batch['mask']))
  return jax.tree.map(lambda x: x / accum, (loss, grads))


def local_grads(params, gdef, batch: dict, key, count=None) -> tuple[jax.Array, dict]:
  """Mean loss and gradients of a batch [B,T], or of [accum,B,T] accumulated micro-batches (scanned, so the
  result equals one accum*B batch). With batch['mask'], the token-weighted masked mean (see mask_count;
  `count` only applies then)."""
  if 'mask' in batch:
    return _masked_local_grads(params, gdef, batch, key, count)
  grad_fn = jax.value_and_grad(loss_fn)
  if batch['inputs'].ndim == 2:
    return grad_fn(params, gdef, batch['inputs'], batch['targets'], key)
  accum = batch['inputs'].shape[0]

  def micro(carry, xs):
    i, x, y = xs
    l, g = grad_fn(params, gdef, x, y, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, carry, (l, g)), None

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(micro, zero, (jnp.arange(accum), batch['inputs'], batch['targets']))
  return jax.tree.map(lambda x: x / accum, (loss, grads))


def flat_dp_grads(params, gdef, batch: dict, key, mesh) -> tuple[jax.Array, dict]:
  """local_grads per device on its batch shard, averaged as one flat buffer. XLA's own data-parallel gradient
  all-reduce is one tuple of every parameter, and XLA:CPU makes the device threads meet once per tuple element:
  one flat buffer meets once, which matters most to small models, whose steps are short. For replicated
  parameters and no dropout (a dropout mask drawn per shard would differ from the global one).

  With batch['mask'], the numerator and the denominator are reduced separately: the mask counts first (one
  scalar psum), then each device's masked loss sum and gradient, divided by global count / devices, in the flat
  buffer; the mean over devices is then sum(ce * mask) / sum(mask) over the global batch (with an all-ones
  mask, the unmasked reduction to float rounding)."""
  rows = parallel.batch_sharding(mesh, batch['inputs'].ndim - 2).spec
  n = mesh.shape[parallel.AXIS]

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), rows, P()),
                     out_specs=(P(), P()), check_vma=False)  # check_vma: the custom-VJP matmul has no rule
  def per_device(params, batch, key):
    if 'mask' in batch:
      total = jax.lax.psum(jnp.sum(batch['mask'].astype(jnp.float32)), parallel.AXIS)
      loss, grads = local_grads(params, gdef, batch, key, jnp.where(total > 0, total, 1.0) / n)
    else:
      loss, grads = local_grads(params, gdef, batch, key)
    flat, unravel = ravel_pytree(grads)
    tot = jax.lax.psum(jnp.concatenate([loss[None], flat]), parallel.AXIS) / mesh.shape[parallel.AXIS]
    return tot[0], unravel(tot[1:])

  return per_device(params, batch, key)


def flat_dp_mesh(mesh, fsdp: bool, dropout: float):
  """The mesh `flat_dp_grads` reduces over, or None where the partitioner's own reduction applies."""
  return mesh if mesh.shape[parallel.AXIS] > 1 and not fsdp and dropout == 0 else None


def train_step(state: dict, batch: dict, step, *, gdef, tx, seed: int, sched=None, dp_mesh=None
               ) -> tuple[dict, dict]:
  """One optimizer update on a batch [B,T] or [accum,B,T] (accumulated micro-batches). A non-finite loss or
  gradient leaves the weights finite. With `sched`, the metrics include this update's learning rate (computed
  here: evaluated eagerly it costs compiles). `dp_mesh`: reduce gradients with `flat_dp_grads` on it. A batch
  may carry 'mask': the loss is then the masked token-weighted mean (see mask_count)."""
  params, key = state['params'], jax.random.fold_in(jax.random.key(seed), step)

  def grads_of(b):
    return flat_dp_grads(params, gdef, b, key, dp_mesh) if dp_mesh is not None else local_grads(params, gdef, b, key)

  loss, grads = _unless_full_mask(batch, grads_of)
  gnorm = optax.tree.norm(grads)
  # A non-finite loss/gradient becomes a zero gradient, so the weights never turn NaN (the loop then stops
  # the run). Masking the gradient, not selecting old vs new state, lets XLA update the donated state in place.
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
  updates, opt = tx.update(grads, state['opt'], params)
  metrics = {'loss': loss, 'grad_norm': gnorm} | ({'lr': sched(step)} if sched is not None else {})
  return {'params': optax.apply_updates(params, updates), 'opt': opt}, metrics


def train_steps(state: dict, batches: dict, step0, *, gdef, tx, seed: int, sched=None, dp_mesh=None
                ) -> tuple[dict, dict]:
  """len(batches) train_steps in one call (lax.scan); metrics come back as [n] arrays. A small model's
  step is not much longer than the dispatch and host sync around it: a call of several steps pays them once."""
  def body(st, xs):
    batch, i = xs
    return train_step(st, batch, step0 + i, gdef=gdef, tx=tx, seed=seed, sched=sched, dp_mesh=dp_mesh)
  n = jax.tree.leaves(batches)[0].shape[0]
  return jax.lax.scan(body, state, (batches, jnp.arange(n, dtype=jnp.int32)))


def _unless_full_mask(batch: dict, fn):
  """fn(batch), where a batch whose 'mask' is all ones runs fn without the mask: bitwise the unmasked step."""
  if 'mask' not in batch:
    return fn(batch)
  plain = {k: v for k, v in batch.items() if k != 'mask'}
  return jax.lax.cond(jnp.all(batch['mask'] != 0), lambda: fn(plain), lambda: fn(batch))


def eval_loss(params, batches: dict, *, gdef) -> jax.Array:
  """Mean loss over stacked batches [batches,B,T]: one call, one batch's activations in memory at a time.
  With batches['mask'], the token-weighted mean over every masked-in token of all the batches (0 when none)."""
  def of(bs):
    if 'mask' in bs:
      part = mask_count(bs['mask']) / bs['inputs'].shape[0]
      return jax.lax.map(lambda b: loss_fn(params, gdef, b['inputs'], b['targets'], None, b['mask'], part),
                         bs).mean()
    return jax.lax.map(lambda b: loss_fn(params, gdef, b['inputs'], b['targets'], None), bs).mean()
  return _unless_full_mask(batches, of)


def steps_per_call(t, flops_per_step: float) -> int:
  """train.steps_per_call, or auto: steps worth about 5e10 FLOPs (a short call on a CPU, so SIGTERM still
  answers quickly), at most 16, dividing the eval and checkpoint intervals (calls never cross them)."""
  if t.steps_per_call:
    return t.steps_per_call
  cap = int(min(16, max(1, 5e10 // flops_per_step)))
  return parallel.largest_divisor(math.gcd(t.eval_every, t.ckpt_every), cap)
