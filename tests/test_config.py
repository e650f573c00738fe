import subprocess
import sys

import pytest
from conftest import run_module

from minillm_jax.config import ConfigError, default_config, from_plain, model_config, to_plain, validate


def cfg_with(**changes):
  c = default_config()
  for k, v in changes.items():
    sec, key = k.split('__')
    c[sec][key] = v
  return c


@pytest.mark.parametrize('changes,message', [
    (dict(model__d_model=130, model__n_head=4), 'model.d_model=130 is not divisible by model.n_head=4'),
    (dict(model__n_kv_head=3), 'model.n_kv_head=3 does not divide model.n_head=4'),
    (dict(model__n_layer=0), 'model.n_layer=0 must be a positive integer'),
    (dict(train__batch_size=-2), 'train.batch_size=-2 must be a positive integer'),
    (dict(optim__lr=0.0), 'optim.lr=0.0 must be > 0'),
    (dict(model__block_size=128, model__max_positions=64), 'model.block_size=128 exceeds model.max_positions=64'),
    (dict(model__pos='alibi'), "model.pos='alibi' is not one of learned, rope"),
    (dict(model__dropout=1.0), 'model.dropout=1.0 must be < 1'),
    (dict(data__val_fraction=0.0), 'data.val_fraction=0.0 must be in (0, 1)'),
    (dict(sample__top_p=1.5), 'sample.top_p=1.5 must be in (0, 1]'),
])
def test_validation_errors(changes, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
    validate(cfg_with(**changes))


def test_warmup_longer_than_the_run_is_clamped_with_a_note(capsys):
  c = validate(cfg_with(optim__warmup_steps=500, train__steps=100))
  assert c.optim.warmup_steps == 10  # a tenth of the run
  assert 'note: optim.warmup_steps=500 exceeds train.steps=100; warming up over 10 steps' in capsys.readouterr().err
  assert validate(cfg_with(optim__warmup_steps=50, train__steps=100)).optim.warmup_steps == 50  # fits: kept


def test_unknown_key_and_wrong_type():
  c = default_config()
  with c.unlocked():
    c.model.n_layers = 3
  with pytest.raises(ConfigError, match='unknown config key model.n_layers; did you mean model.n_layer'):
    validate(c)
  c = default_config()  # a config file that rebuilt a field with the wrong type
  with c.unlocked():
    del c.model['norm_eps']
    c.model.norm_eps = 'x'
  with pytest.raises(ConfigError, match="model.norm_eps='x' has type str; it must be of type float"):
    validate(c)
  c = default_config()
  with c.unlocked():
    del c.train['steps']
  with pytest.raises(ConfigError, match='config is missing train.steps'):
    validate(c)


def test_plain_round_trip_and_model_config():
  c = default_config()
  c.model.n_kv_head = 2
  back = from_plain(to_plain(c))
  assert to_plain(back) == to_plain(c)
  m = model_config(back, vocab_size=65)
  assert (m.vocab_size, m.n_kv_head, m.d_ff, m.max_positions) == (65, 2, 512, 64)
  with pytest.raises(ConfigError, match='model.vocab_size is unset'):
    model_config(default_config())


@pytest.mark.parametrize('args,message', [
    (['--config=configs/tiny.py', '--config.model.n_head=7'], 'error: config: model.d_model=512 is not divisible'),
    (['--config=configs/tiny.py', '--config.model.n_layers=4'], 'Did you mean "n_layer"'),
    (['--config=configs/tiny.py', '--config.model.n_layer=four'], "invalid literal for int() with base 10: 'four'"),
    (['--config=configs/tiny.py', '--config.optim.lr=-1'], 'error: config: optim.lr=-1.0 must be > 0'),
    (['--config=configs/nope.py'], "error: config file 'configs/nope.py' not found"),
    ([], 'error: no config given'),
    (['--config=configs/tiny.py', '--config.foo.bar=1'], "no config section 'foo' (sections: data, model, optim"),
    (['--config=configs/tiny.py', '--config.train.workdir=x'], 'pass it as --workdir=DIR'),
    (['--config={tmp}/syntax.py'], 'error: cannot load config {tmp}/syntax.py:2: SyntaxError'),
    (['--config={tmp}/raises.py'], 'error: cannot load config {tmp}/raises.py:3: RuntimeError: no data here'),
    (['--config=configs/nope.py', '--config.optim.lr=1'], "error: config file 'configs/nope.py' not found"),
    (['--config=configs', '--config.optim.lr=1'], "error: config file 'configs' is a directory"),
    (['--config={tmp}/empty.py', '--config.optim.lr=1'], ('error: cannot load config {tmp}/empty.py: it defines no '
                                                        'get_config()')),
])
def test_cli_bad_config_is_one_line_exit_2(args, message, tmp_path):
  (tmp_path / 'syntax.py').write_text('# a config\ndef get_config(:\n  pass\n')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  (tmp_path / 'raises.py').write_text('def get_config(variant=""):\n  del variant\n  raise RuntimeError("no data here")\n')
  args, message = [a.format(tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
  r = run_module('minillm_jax.model', *args)
  assert r.returncode == 2
  assert message in r.stderr
  assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_override_applies():
  r = run_module('minillm_jax.model', '--config=configs/tiny.py', '--config.model.n_layer=2')
  assert r.returncode == 0 and '2 layers' in r.stdout


def test_preset_variant_typo_is_refused():
  r = run_module('minillm_jax.model', '--config=configs/tiny.py:big')
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert "cannot load config configs/tiny.py: ConfigError: unknown variant 'big'" in r.stderr, r.stderr


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
  # a run's config.json must name the same files from any directory (resume, evaluate)
  from minillm_jax.config import absolute_paths
  monkeypatch.chdir(tmp_path)
  c = default_config()
  c.data.update(path='a.txt, docs/*.md', cache_dir='cache', tokenizer='tok.json')
  c.train.init_from = 'runs/base'
  absolute_paths(c)
  assert c.data.path == f'{tmp_path}/a.txt,{tmp_path}/docs/*.md' and c.data.cache_dir == f'{tmp_path}/cache'
  assert c.data.tokenizer == f'{tmp_path}/tok.json' and c.train.init_from == f'{tmp_path}/runs/base'
  for spec in ('char', 'bpe', 'hub:gpt2'):
    c.data.tokenizer = spec
    assert absolute_paths(c).data.tokenizer == spec


def _model_from(cwd, *args):
  # from a directory that is not the checkout: what a user of an installed package does
  return subprocess.run([sys.executable, '-m', 'minillm_jax.model', *args], cwd=cwd, capture_output=True, text=True,
                        check=False, timeout=300)


@pytest.mark.parametrize('args', [['--config=tiny:mini'], ['--config', 'tiny.py:mini'],
                                  ['--config=configs/tiny_sft.py:mini', '--config.model.block_size=256']])
def test_presets_by_name_from_any_directory(args, tmp_path):
  """A preset's name (name:variant), and the README's configs/<name>.py where no such file is, load the preset."""
  r = _model_from(tmp_path, *args)
  assert r.returncode == 0, r.stderr
  assert '4 layers, d_model 256' in r.stdout and '(context 256)' in r.stdout, r.stdout


def test_an_existing_file_wins_over_a_preset_name(tmp_path):
  (tmp_path / 'tiny.py').write_text('from minillm_jax.config import default_config\n\n\ndef get_config():\n'
                                    '  c = default_config()\n  c.model.update(n_layer=1, vocab_size=100)\n  return c\n')
  r = _model_from(tmp_path, '--config=tiny.py')
  assert r.returncode == 0 and '1 layers' in r.stdout, r.stderr


def test_an_unknown_preset_name_lists_the_presets(tmp_path):
  r = _model_from(tmp_path, '--config=tiny_mini')
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("error: unknown preset 'tiny_mini'; presets: basic10m, ") and 'tiny, tiny_sft' in r.stderr


def test_presets_resolve_to_the_installed_copy_in_a_wheel_layout(tmp_path, monkeypatch):
  """In a wheel the presets are minillm_jax/presets (pyproject.toml maps configs/ there); no checkout around."""
  from minillm_jax import cli
  pkg = tmp_path / 'site-packages' / 'minillm_jax'
  (pkg / 'presets').mkdir(parents=True)
  for name in ('tiny', 'nano'):
    (pkg / 'presets' / f'{name}.py').write_text('')
  monkeypatch.setattr(cli, '__file__', str(pkg / 'cli.py'))
  monkeypatch.chdir(tmp_path)
  assert cli.preset_names() == ['nano', 'tiny']
  assert cli.resolve_config('tiny:mini') == f'{pkg}/presets/tiny.py:mini'
  assert cli.resolve_config('configs/nano.py') == f'{pkg}/presets/nano.py'
  assert cli.resolve_config('elsewhere/tiny.py') == 'elsewhere/tiny.py'  # a path: left to the missing-file error
