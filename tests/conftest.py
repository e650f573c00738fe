import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# The C++ kernels are on by default only on the CPU classes where they were measured faster; the tests check
# their results on whatever CPU runs them (tests/test_kernel_policy.py checks the defaults themselves).
for _switch in ('MINILLM_CPU_ATTENTION', 'MINILLM_CPU_MATMUL', 'MINILLM_CPU_BF16'):
  os.environ.setdefault(_switch, '1')
# one XLA compilation cache for the session's runs (not the user's ~/.cache): repeated shapes compile once;
# made by the process that starts the session (xdist workers inherit it) and removed when that one exits
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='minillm-xla-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m module args` from the repo root, as a user would."""
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True, text=True, check=False,
                        timeout=timeout, env={**os.environ, **(env or {})})
