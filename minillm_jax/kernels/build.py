"""The C++ kernels of XLA:CPU (cpu_attention.cc, cpu_matmul.cc, cpu_bf16.cc): which are on for this CPU, and
their build. A kernel is compiled with the machine's C++ compiler on first use into a cache keyed by the
source and the headers beside it, jaxlib's version, the CPU, the flags and the compiler, then registered as
XLA FFI custom-call targets. Without a compiler, or after a failed build (remembered beside the cache entry,
so it is not retried on every run), a kernel is unavailable (one warning) and its caller keeps a pure-JAX
path that computes the same function.

Each kernel is on by default only on the CPU classes where a whole train or decode step measured at least 15%
faster with it than with XLA alone (BENCHMARKS.md, "CPU kernels"); elsewhere it is off unless its switch
(an environment variable) is 1. 0 turns it off everywhere.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jaxlib
from absl import logging

from minillm_jax import cli, parallel

# No -ffast-math: with GCC < 13 it links code into the library that sets flush-to-zero for the whole process.
FLAGS = ['-O3', '-march=native', '-fno-math-errno', '-std=c++17', '-shared', '-fPIC', '-w']
X86_FLAGS = ['-mprefer-vector-width=512']  # the vector helpers are written for 16 floats (cpu_simd.h)


def cpu_class() -> str:
  """'x86-avx512' | 'x86-avx2' | 'x86' | the machine name elsewhere ('aarch64', 'arm64', ...)."""
  machine = platform.machine().lower()
  if machine in ('x86_64', 'amd64'):
    flags = parallel.cpu_flags()
    return 'x86-avx512' if 'avx512f' in flags else 'x86-avx2' if 'avx2' in flags else 'x86'
  return machine or 'unknown'


def enabled(switch: str, default_on: tuple[str, ...]) -> bool:
  """The kernel's switch when set (1 on, 0 off), else whether this CPU class is one it was measured to win on."""
  v = os.environ.get(switch, '').strip()
  if v in ('0', '1'):
    return v == '1'
  if v:
    logging.warning('%s=%r: use 1 (on) or 0 (off); using the default for this CPU', switch, v)
  return cpu_class() in default_on


def _cpu_id() -> str:
  """-march=native: a library built for one CPU may not run on another sharing the cache (a home on NFS)."""
  model = ''
  try:
    with open('/proc/cpuinfo') as f:
      model = next((ln for ln in f if ln.startswith(('model name', 'CPU part'))), '')
  except OSError:
    pass
  return ' '.join([platform.machine(), platform.processor(), model.strip(), *sorted(parallel.cpu_flags())])


def build(src: pathlib.Path, extra: tuple[str, ...] = ()) -> pathlib.Path:
  """Path of the compiled library of `src` (with `extra` compiler/linker flags), building it if this
  source/jaxlib/CPU/flags have none yet. Raises RuntimeError on failure, also for a build that failed before."""
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
  if cxx is None:
    raise RuntimeError('no C++ compiler (g++, c++ or clang++) on PATH; set CXX to one')
  flags = [*FLAGS, *(X86_FLAGS if cpu_class().startswith('x86') else []), f'-I{jax.ffi.include_dir()}']
  headers = [h.read_text() for h in sorted(src.parent.glob('*.h'))]  # what the sources include from their folder
  key = hashlib.sha256(b'\0'.join(x.encode() for x in [src.read_text(), *headers, jaxlib.__version__, _cpu_id(),
                                                         ' '.join([*flags, *extra]), cxx])).hexdigest()[:16]
  out = pathlib.Path(cli.cache_dir()) / f'{src.stem}-{key}.so'
  failed = out.with_suffix('.failed')
  if out.exists():
    return out
  if failed.exists():
    raise RuntimeError(f'{failed.read_text().strip()} (an earlier build; delete {failed} to try again)')
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: parallel builds are safe
    so = pathlib.Path(tmp) / out.name
    cmd = [*shlex.split(cxx), *flags, str(src), '-o', str(so), *extra]  # CXX='ccache g++'; libraries last
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
      lines = r.stderr.splitlines()
      why = next((ln for ln in lines if 'error' in ln), lines[-1] if lines else f'exit status {r.returncode}')
      msg = f'{cxx} could not build {src.name}: {why.strip()}'
      failed.write_text(msg + '\n')
      raise RuntimeError(msg)
    os.replace(so, out)
  return out


def load(src: pathlib.Path, targets: dict[str, str], fallback: str, extra: tuple[str, ...] = ()):
  """The built library of `src` with each symbol of `targets` registered as its FFI target name, or None after
  one warning '<fallback>: <why>' (no compiler, a failed build, an unloadable library)."""
  try:
    path = build(src, extra)
    try:
      lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError:  # e.g. built by a C compiler (CXX=gcc): unloadable, so rebuilt next time rather than kept
      path.unlink(missing_ok=True)
      raise
  except (RuntimeError, OSError) as e:
    logging.warning('%s: %s', fallback, str(e).splitlines()[0])
    return None
  for name, symbol in targets.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  return lib
