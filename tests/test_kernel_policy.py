"""Which C++ kernels are on where, how a failed build is remembered, and how the CPU devices are made: the
defaults follow BENCHMARKS.md's "CPU kernels" table, and nothing depends on JAX's private modules."""
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT

from minillm_jax import parallel
from minillm_jax.kernels import attention, build, matmul


@pytest.mark.parametrize('machine, flags, want', [
    ('x86_64', {'avx2', 'avx512f', 'amx_bf16'}, 'x86-avx512'),
    ('x86_64', {'avx2', 'fma'}, 'x86-avx2'),
    ('AMD64', {'sse2'}, 'x86'),
    ('aarch64', {'asimd', 'sve'}, 'aarch64'),
    ('arm64', set(), 'arm64'),
])
def test_cpu_class(machine, flags, want, monkeypatch):
  monkeypatch.setattr(build.platform, 'machine', lambda: machine)
  monkeypatch.setattr(parallel, 'cpu_flags', lambda: flags)
  assert build.cpu_class() == want


def test_defaults_follow_the_measured_classes_and_switches_override(monkeypatch):
  monkeypatch.delenv('MINILLM_CPU_ATTENTION', raising=False)
  for cls in ('x86-avx512', 'x86-avx2', 'aarch64', 'arm64'):
    monkeypatch.setattr(build, 'cpu_class', lambda cls=cls: cls)
    for switch, on in (('MINILLM_CPU_ATTENTION', attention.ATTENTION_ON), ('MINILLM_CPU_MATMUL', matmul.MATMUL_ON),
                       ('MINILLM_CPU_BF16', matmul.BF16_ON), ('MINILLM_CPU_MATMUL', matmul.DECODE_ON)):
      monkeypatch.delenv(switch, raising=False)
      assert build.enabled(switch, on) == (cls in on)
      monkeypatch.setenv(switch, '1')
      assert build.enabled(switch, on)
      monkeypatch.setenv(switch, '0')
      assert not build.enabled(switch, on)
  # never measured: ARM and Apple silicon run XLA alone unless asked
  for on in (attention.ATTENTION_ON, matmul.MATMUL_ON, matmul.BF16_ON, matmul.DECODE_ON):
    assert not {'aarch64', 'arm64'} & set(on)
  assert matmul.DECODE_ON == ('x86-avx2',)  # batched decoding on OpenBLAS: measured on AVX2 only


def test_a_bad_switch_value_warns_and_keeps_the_default(monkeypatch):
  monkeypatch.setattr(build, 'cpu_class', lambda: 'aarch64')
  monkeypatch.setenv('MINILLM_CPU_ATTENTION', 'yes')
  assert build.enabled('MINILLM_CPU_ATTENTION', ('aarch64',))
  assert not build.enabled('MINILLM_CPU_ATTENTION', ('x86-avx512',))


def test_a_failed_build_is_remembered_not_retried(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  src = tmp_path / 'broken.cc'
  src.write_text('this is not C++;\n')
  calls = []
  real = subprocess.run
  def counting(cmd, **kw):
    calls.extend([cmd] if str(src) in cmd else [])  # compiler runs only (not uname)
    return real(cmd, **kw)
  monkeypatch.setattr(build.subprocess, 'run', counting)
  with pytest.raises(RuntimeError, match='could not build broken.cc') as first:
    build.build(src)
  assert len(calls) == 1 and 'an earlier build' not in str(first.value)
  with pytest.raises(RuntimeError, match=r'could not build broken.cc.*an earlier build; delete .*\.failed'):
    build.build(src)
  assert len(calls) == 1  # the compiler did not run again
  src.write_text('extern "C" int minillm_ok() { return 1; }\n')  # a changed source is a new key: built
  assert build.build(src).exists() and len(calls) == 2


def test_the_cache_key_includes_the_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  src = tmp_path / 'ok.cc'
  src.write_text('extern "C" int minillm_ok() { return 1; }\n')
  a = build.build(src)
  monkeypatch.setattr(build, '_cpu_id', lambda: 'aarch64 Features: asimd sve')
  b = build.build(src)
  assert a != b and a.exists() and b.exists()


def test_cpu_devices_through_jax_config_and_not_after_start():
  code = ('from minillm_jax import parallel\nimport jax\nfirst = parallel.use_cpu_devices(2)\n'
          'n = len(jax.devices())\nprint(first, n, parallel.use_cpu_devices(3), len(jax.devices()))')
  env = {'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, env=env, check=False)
  assert r.stdout.split() == ['True', '2', 'False', '2'], r.stderr[-2000:]


def test_no_private_jax_imports():
  offenders = [str(p.relative_to(ROOT)) for d in ('minillm_jax', 'torch_compat')
               for p in pathlib.Path(ROOT, d).rglob('*.py') if 'jax._src' in p.read_text()]
  assert offenders == []
