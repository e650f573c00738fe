"""torch_compat: the torch mirror against the Flax model, the one conversion table, every format both ways,
and the Hugging Face exports loaded by transformers itself. Tiny models, CPU, offline."""
import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ROOT, run_module
from flax import nnx
from torch_fixtures import (
  ALL_HF,
  BASE,
  FAMILIES,
  TOK,
  assert_flat_equal,
  jax_logits,
  mirror,
  random_flat,
  tokens,
)

from minillm_jax import workdir as wd
from minillm_jax.config import UserError
from torch_compat import convert, formats, hf, nanogpt, pt

# ------------------------------------------------------------------------------------------------ mirror

@pytest.mark.parametrize('fam', FAMILIES)
def test_mirror_logits_match_flax(fam):
  c = FAMILIES[fam]
  flat, tok = random_flat(c), tokens(c)
  lj = jax_logits(c, flat, tok)
  m = mirror(c, flat)
  with torch.no_grad():
    lt = m(torch.tensor(tok)).numpy()
    cache = m.init_cache(2)  # prefill 7, then one token at a time: the same logits as the full forward
    parts = [m.decode(torch.tensor(tok[:, :7]), cache, 0)[0]]
    parts += [m.decode(torch.tensor(tok[:, t:t + 1]), cache, t)[0] for t in range(7, tok.shape[1])]
  diff = float(np.abs(lj - lt).max())
  print(f'{fam}: max |flax - torch| = {diff:.2e} (logits up to {np.abs(lj).max():.1f})')
  assert lt.dtype == np.float32 and diff <= 1e-4
  assert float(np.abs(torch.cat(parts, 1).numpy() - lt).max()) <= 1e-5


def jax_greedy(c, flat, prompt, n):
  """Greedy decoding with the Flax model's KV cache: prefill, then one token per jitted step."""
  model = convert.load_into_flax(c, flat)
  gdef, state = nnx.split(model)

  @jax.jit
  def step(state, tok, cache, pos):
    logits, cache = nnx.merge(gdef, state).decode(tok, cache, pos)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

  B, T = prompt.shape
  nxt, cache = step(state, jnp.asarray(prompt), model.init_cache(B, T + n), 0)
  out = [nxt]
  for i in range(n - 1):
    nxt, cache = step(state, nxt[:, None], cache, T + i)
    out.append(nxt)
  return np.concatenate([prompt, np.stack(out, 1)], 1)


@pytest.mark.parametrize('fam', FAMILIES)
def test_greedy_generation_identical(fam):
  c = FAMILIES[fam]
  flat, prompt = random_flat(c, seed=3), tokens(c, T=5, seed=4)
  want = jax_greedy(c, flat, prompt, 64)
  got = mirror(c, flat).generate(torch.tensor(prompt), 64).numpy()
  assert got.shape == (2, 69)
  np.testing.assert_array_equal(got, want)
  assert len(set(want[0, 5:].tolist())) > 3  # not a degenerate repeat of one token


def test_mirror_imports_no_jax_and_picks_device(tmp_path):
  c = FAMILIES['llama']
  pt.save_pt(str(tmp_path / 'm.pt'), c, random_flat(c), TOK, {'step': 7})
  code = ('import sys; sys.modules["jax"] = None; sys.modules["flax"] = None\n'
          'import torch; from torch_compat import model as M\n'
          f'm, tok, meta = M.load({str(tmp_path / "m.pt")!r}, device="cpu")\n'
          'out = m.generate(torch.tensor([[1, 2]]), 3)\n'
          'print(meta["step"], len(tok) > 0, out.shape[1], M.pick_device())')
  import subprocess
  import sys
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     check=False)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ['7', 'True', '5', 'cpu']


# ---------------------------------------------------------------------------------------------- native .pt

@pytest.mark.parametrize('fam', FAMILIES)
def test_pt_round_trip_bit_exact(fam, tmp_path):
  c, path = FAMILIES[fam], str(tmp_path / 'model.pt')
  flat = random_flat(c)
  meta = {'step': 5, 'val_loss': np.float32(1.5), 'config': {'train': {'steps': 9}}, 'tokenizer': 'dropped',
          'model_config': 'dropped'}
  pt.save_pt(path, c, flat, TOK, meta)
  raw = torch.load(path, weights_only=True)
  assert set(raw) == {'model', 'model_config', 'tokenizer', 'meta'} and raw['model_config'] == c.to_dict()
  assert raw['meta'] == {'step': 5, 'val_loss': 1.5, 'config': {'train': {'steps': 9}}}
  imp = formats.load_any(path)
  assert imp.fmt == 'pt' and imp.model_config == c and imp.tokenizer_json == TOK
  assert imp.cfg_plain == {'train': {'steps': 9}}
  assert_flat_equal(imp.flat, flat)


class NotPlain:  # any class: torch.load(weights_only=True) must not unpickle it
  def __init__(self):
    self.x = 1


def test_pt_with_pickled_object_is_refused(tmp_path):
  path = str(tmp_path / 'evil.pt')
  torch.save({'model': {}, 'model_config': BASE.to_dict(), 'meta': NotPlain()}, path)
  with pytest.raises(UserError, match=r'refusing to load .*evil\.pt: it holds pickled objects other than '):
    formats.load_any(path)
  with pytest.raises(UserError, match='only plain data'):
    pt.save_pt(str(tmp_path / 'x.pt'), BASE, random_flat(BASE), None, {'obj': NotPlain()})


def test_corrupt_pt_is_named_as_such_not_as_unsafe(tmp_path):
  good = str(tmp_path / 'good.pt')
  pt.save_pt(good, BASE, random_flat(BASE), None, {})
  data = pathlib.Path(good).read_bytes()
  cases = {'text.pt': b'not a checkpoint\n', 'truncated.pt': data[:len(data) // 2], 'empty.pt': b''}
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf'{name} is not a readable torch checkpoint') as e:
      formats.load_any(str(path))
    assert '\n' not in str(e.value) and len(str(e.value)) < 300 and 'could run code' not in str(e.value)


def test_wrong_shapes_and_names_are_named(tmp_path):
  c = FAMILIES['tiny']
  sd = convert.flax_to_torch(c, random_flat(c), 'pt')
  bad = dict(sd, **{'transformer.h.1.attn.c_attn.weight': torch.zeros(96, 16)})
  with pytest.raises(UserError, match=r'tensor transformer\.h\.1\.attn\.c_attn\.weight: expected shape '
                                      r'\(96, 32\), found \(96, 16\)'):
    convert.torch_to_flax(c, bad, 'pt')
  missing = {k: v for k, v in sd.items() if k != 'lm_head.weight'}
  with pytest.raises(UserError, match=r'lacks tensor lm_head\.weight \(expected shape \(97, 32\)\)'):
    convert.torch_to_flax(c, missing, 'pt')
  with pytest.raises(UserError, match=r'unexpected tensors \[.transformer\.h\.0\.ln_1\.bias.\]'):
    convert.torch_to_flax(c, dict(sd, **{'transformer.h.0.ln_1.bias': torch.zeros(32)}), 'pt')
  flat = random_flat(c)
  flat['wte'] = flat['wte'][:50]
  with pytest.raises(UserError, match=r'parameter wte: expected shape \(97, 32\) .*found \(50, 32\)'):
    convert.load_into_flax(c, flat)
  path = str(tmp_path / 'bad.pt')
  torch.save({'model': bad, 'model_config': c.to_dict(), 'tokenizer': '', 'meta': {}}, path)
  with pytest.raises(UserError, match=r'c_attn\.weight: expected shape \(96, 32\), found \(96, 16\)'):
    formats.load_any(path)


# ---------------------------------------------------------------------------------------------------- CLIs

def test_cli_export_import_round_trip(tmp_path):
  from minillm_jax.training import checkpoint
  from torch_compat.export import export
  from torch_compat.import_ckpt import import_ckpt
  c = FAMILIES['tiny']
  flat = random_flat(c)
  src = str(tmp_path / 'run')
  checkpoint.init_workdir(src, None, c, convert.load_into_flax(c, flat), TOK, {})
  for fmt, out in (('pt', 'm.pt'), ('hf', 'hf_dir')):
    msg = export(src, str(tmp_path / out), fmt, 'latest')
    assert msg.startswith(f'wrote {tmp_path / out}')
    assert 'GPTNeoXForCausalLM' in msg or fmt == 'pt'
    dst = str(tmp_path / f'imported_{fmt}')
    assert 'with tokenizer' in import_ckpt(str(tmp_path / out), dst)
    mc, model, tok, meta = checkpoint.load_for_inference(dst, 'latest')
    assert mc == c and tok == TOK and meta['source_format'] in ('pt', 'hf-neox')
    assert not wd.own_run(dst)  # marked as imported: evaluate runs its generated code only with --execute
    assert_flat_equal(convert.flax_flat(model), flat)
  r = run_module('torch_compat.export', f'--workdir={src}', f'--out={tmp_path / "n.pt"}', '--format=nanogpt')
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: nanoGPT cannot represent')
  r = run_module('torch_compat.import_ckpt', f'--src={tmp_path / "nope.pt"}', f'--workdir={tmp_path / "x"}')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == f'error: --src={tmp_path / "nope.pt"} does not exist'
  # nothing of an existing run is overwritten: not by an hf export into it, not by an import into it
  run_files = {n: pathlib.Path(src, n).read_text() for n in ('config.json', 'config.py')}
  with pytest.raises(UserError, match=r'already holds other files \(checkpoints, config.py'):
    export(src, src, 'hf', 'latest')
  export(src, str(tmp_path / 'hf_dir'), 'hf', 'latest')  # a previous export's directory may be rewritten
  with pytest.raises(UserError, match=r'is a directory; this format writes a file'):
    export(src, str(tmp_path / 'hf_dir'), 'pt', 'latest')
  for fmt, victim in (('pt', 'config.json'), ('pt', 'config.py'), ('pt', 'hf_dir/config.json')):
    path = tmp_path / victim if victim.startswith('hf_dir') else pathlib.Path(src, victim)
    before = path.read_bytes()
    with pytest.raises(UserError, match=r'exists and is not a torch checkpoint; refusing to overwrite it'):
      export(src, str(path), fmt, 'latest')
    assert path.read_bytes() == before
  export(src, str(tmp_path / 'm.pt'), 'pt', 'latest')  # an earlier torch export may be replaced
  os.makedirs(tmp_path / 'other' / 'checkpoints')
  (tmp_path / 'other' / 'metrics.jsonl').write_text('{"step": 5}\n')
  with pytest.raises(UserError, match=r"already holds files \(metrics.jsonl\); import into a new"):
    import_ckpt(str(tmp_path / 'm.pt'), str(tmp_path / 'other'))
  assert {n: pathlib.Path(src, n).read_text() for n in run_files} == run_files
  assert (tmp_path / 'other' / 'metrics.jsonl').read_text() == '{"step": 5}\n'
  half = tmp_path / 'half'  # what an import killed during its checkpoint save leaves: it can be run again
  os.makedirs(half / 'checkpoints' / '0.orbax-checkpoint-tmp' / 'params.orbax-checkpoint-tmp')
  (half / 'config.json').write_text('{}')
  import_ckpt(str(tmp_path / 'm.pt'), str(half))
  assert_flat_equal(convert.flax_flat(checkpoint.load_for_inference(str(half), 'latest')[1]), flat)
  assert os.listdir(half / 'checkpoints') == ['0']


def test_one_table_covers_every_layout():
  """For every config and layout, flax_to_torch writes exactly the tensors torch_shapes predicts (zero biases
  and nanoGPT's tied head included), and the table's names are the ones the classes use."""
  for c in {**ALL_HF, 'llama_gqa_bias': dataclasses.replace(FAMILIES['llama'], bias=True)}.values():
    flat = random_flat(c)
    fmts = ('pt', hf.arch_for(c)) + (('nanogpt',) if not nanogpt.nanogpt_problems(c) else ())
    for fmt in fmts:
      sd = convert.flax_to_torch(c, flat, fmt)
      assert {k: tuple(v.shape) for k, v in sd.items()} == convert.torch_shapes(c, fmt) | (
          {'lm_head.weight': (c.vocab_size, c.d_model)} if fmt == 'nanogpt' else {})
      assert_flat_equal(convert.torch_to_flax(c, sd, fmt), flat)
  assert convert.torch_names('llama', 'blocks.3.attn.qkv.kernel') == tuple(
      f'model.layers.3.self_attn.{p}_proj.weight' for p in 'qkv')
  assert convert.torch_names('neox', 'head.kernel') == ('embed_out.weight',)


def test_corrupt_hf_directory_is_named(tmp_path):
  c = FAMILIES['gpt2']
  d = str(tmp_path / 'hf')
  hf.save_hf(d, c, random_flat(c), TOK, {})
  st = os.path.join(d, 'model.safetensors')
  data = pathlib.Path(st).read_bytes()
  pathlib.Path(st).write_bytes(data[:len(data) // 3])
  with pytest.raises(UserError, match=r'model\.safetensors is not a readable safetensors file'):
    formats.load_any(d)
  os.remove(st)
  with open(st + '.index.json', 'w') as f:
    json.dump({'weight_map': {'lm_head.weight': 'model-00001-of-00002.safetensors'}}, f)
  with pytest.raises(UserError, match=r'model-00001-of-00002\.safetensors does not exist'):
    formats.load_any(d)
  with open(st + '.index.json', 'w') as f:
    f.write('{"weight_map": ')
  with pytest.raises(UserError, match=r'cannot read .*index\.json'):
    formats.load_any(d)


@pytest.mark.parametrize('change,match', [
    ({'n_layer': '4'}, r"model\.n_layer='4' has type str"),
    ({'n_head': 0}, r'model\.n_head=0 must be a positive integer'),
    ({'block_size': 128, 'max_positions': 64}, r'model\.block_size=128 exceeds model\.max_positions=64'),
    ({'dtype': 'float16'}, r"model\.dtype='float16' is not one of")])
def test_model_config_values_in_a_pt_are_checked(change, match, tmp_path):
  path = str(tmp_path / 'm.pt')
  pt.save_pt(path, BASE, random_flat(BASE), None, {})
  ckpt = torch.load(path, weights_only=True)
  ckpt['model_config'].update(change)
  torch.save(ckpt, path)
  with pytest.raises(UserError, match=rf'm\.pt: bad model_config: {match}'):
    formats.load_any(path)


def test_malformed_hf_config_values_are_one_line_errors(tmp_path):
  c = FAMILIES['llama']
  d = str(tmp_path / 'hf')
  hf.save_hf(d, c, random_flat(c), TOK, {})
  cfg_path = os.path.join(d, 'config.json')
  j = json.loads(pathlib.Path(cfg_path).read_text())
  del j['minillm']  # read as a foreign Llama config
  for change, match in (({'rope_scaling': 'linear'}, r'unexpected type or form \(AttributeError'),
                        ({'num_hidden_layers': '2'}, r"model\.n_layer='2' has type str"),
                        ({'rms_norm_eps': None}, r'unexpected type or form \(TypeError')):
    pathlib.Path(cfg_path).write_text(json.dumps({**j, **change}))
    with pytest.raises(UserError, match=match):
      formats.load_any(d)
  pathlib.Path(cfg_path).write_text(json.dumps([j]))
  with pytest.raises(UserError, match=r'config\.json holds a list, not a Hugging Face config object'):
    formats.load_any(d)
