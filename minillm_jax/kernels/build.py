"""The C++ kernels of XLA:CPU (cpu_attention.cc, cpu_attention_amx.cc, cpu_matmul.cc): compiled with the machine's
C++ compiler on first use into a cache keyed by the source and the headers beside it (cpu_parallel.h,
cpu_simd.h), jaxlib's version, the CPU, the flags and the compiler, once per machine (3-7 s on 2 cores), then
registered as XLA FFI custom-call targets. Without a compiler a kernel is unavailable (one warning) and its
caller keeps a pure-JAX path that computes the same function."""
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

from minillm_jax import cli

# No -ffast-math: with GCC < 13 it links code into the library that sets flush-to-zero for the whole process.
FLAGS = ['-O3', '-march=native', '-fno-math-errno', '-mprefer-vector-width=512', '-std=c++17', '-shared', '-fPIC', '-w']


def _cpu_id() -> str:
  try:  # -march=native: a library built for one CPU may not run on another sharing the cache (home on NFS)
    return next(l for l in open('/proc/cpuinfo') if l.startswith('flags'))
  except (OSError, StopIteration):
    return platform.processor() + platform.machine()


def build(src: pathlib.Path, extra: tuple[str, ...] = ()) -> pathlib.Path:
  """Path of the compiled library of `src` (with `extra` compiler/linker flags), building it if this
  source/jaxlib/CPU/flags have none yet. Raises RuntimeError on failure."""
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
  if cxx is None:
    raise RuntimeError('no C++ compiler (g++, c++ or clang++) on PATH; set CXX to one')
  flags = [*FLAGS, f'-I{jax.ffi.include_dir()}']
  headers = [h.read_text() for h in sorted(src.parent.glob('*.h'))]  # what the sources include from their folder
  key = hashlib.sha256(b'\0'.join(x.encode() for x in [src.read_text(), *headers, jaxlib.__version__, _cpu_id(),
                                                         ' '.join([*flags, *extra]), cxx])).hexdigest()[:16]
  out = pathlib.Path(cli.cache_dir()) / f'{src.stem}-{key}.so'
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: parallel builds are safe
    so = pathlib.Path(tmp) / out.name
    cmd = [*shlex.split(cxx), *flags, str(src), '-o', str(so), *extra]  # CXX='ccache g++'; libraries last
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
      lines = r.stderr.splitlines()
      why = next((l for l in lines if 'error' in l), lines[-1] if lines else f'exit status {r.returncode}')
      raise RuntimeError(f'{cxx} could not build {src.name}: {why.strip()}')
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
