"""The code-generation suite of `evaluate`: fixed prompts per category, the checks that score greedy
completions, and the execution of generated functions against unit tests, each in its own subprocess with
limits (never in-process)."""
from __future__ import annotations

import ast
import math
import os
import secrets
import subprocess
import sys
import tempfile

import numpy as np

from minillm_jax.inference.backend import Backend, SampleParams
from minillm_jax.inference.text import complete

CODE_CATEGORIES = ('bracket_completion', 'keyword_completion', 'indentation', 'function_completion', 'docstring',
                   'syntax_validity', 'execution')
BRACKETS = ['print(len(items)', 'result = max(values[0], values[1]', 'data = {"a": [1, 2, 3]', 'x = f(g(1, 2)',
            'matrix = [[1, 2], [3, 4]', 'if (a and (b or c)', 'total = sum([v * 2 for v in range(10)]',
            'names = sorted(set(words), key=len']
KEYWORDS = [('for i in ran', 'ge'), ('def f(x):\n    ret', 'urn'), ('while True:\n    if done:\n        bre', 'ak'),
            ('try:\n    x = int(s)\nexc', 'ept'), ('from collections import defaultd', 'ict'),
            ('if x is not No', 'ne'), ('        raise ValueEr', 'ror'), ('    if isinst', 'ance(')]
INDENT = ['def area(r):\n', 'for item in items:\n', 'if x > 0:\n', 'class Point:\n', 'while n > 1:\n', 'try:\n',
          'with open(path) as f:\n', 'class A:\n    def method(self):\n']
DOCSTRINGS = ['def add(a, b):\n    """', 'def read_lines(path):\n    """', 'def is_prime(n):\n    """',
              'class Stack:\n    """', 'def mean(values):\n    """', 'def clamp(x, lo, hi):\n    """']
FUNCTIONS = ['def fibonacci(n):\n', 'def flatten(nested):\n', 'def count_words(text):\n', 'def merge(a, b):\n',
             'def binary_search(items, target):\n', 'def unique(values):\n']
EXEC = [  # (prompt, unit tests)
    ('def add(a, b):\n    """Return the sum of a and b."""\n', 'assert add(2, 3) == 5\nassert add(-1, 1) == 0'),
    ('def is_even(n):\n    """Return True if n is even."""\n', 'assert is_even(4) and not is_even(7)'),
    ('def reverse(s):\n    """Return the string s reversed."""\n', 'assert reverse("abc") == "cba"'),
    ('def maximum(values):\n    """Return the largest value in the list."""\n', 'assert maximum([3, 9, 2]) == 9'),
    ('def factorial(n):\n    """Return n factorial."""\n', 'assert factorial(5) == 120\nassert factorial(0) == 1'),
    ('def square(x):\n    """Return x squared."""\n', 'assert square(3) == 9 and square(-2) == 4'),
]
# Limits, then HumanEval's reliability guard (destructive os/shutil/subprocess calls and exit() disabled): not a
# security sandbox, a guard against generated code that deletes files or kills processes by accident.
_HARNESS = """import resource as _r, os as _os, shutil as _sh, subprocess as _sp, builtins as _b
for _k, _v in ((_r.RLIMIT_AS, 1 << 30), (_r.RLIMIT_FSIZE, 1 << 20), (_r.RLIMIT_CPU, {cpu})):
    try:
        _r.setrlimit(_k, (_v, _v))
    except (ValueError, OSError):
        pass
for _m, _ns in ((_os, 'kill killpg system popen fork forkpty remove removedirs rmdir unlink rename renames replace '
                      'truncate chmod chown lchown chroot chdir fchdir setuid'),
                (_sh, 'rmtree move chown'), (_sp, 'Popen run call check_call check_output'), (_b, 'exit quit')):
    for _n in _ns.split():
        setattr(_m, _n, None)
_w, _so = _os.write, __import__('sys').stdout
del _r, _k, _v, _m, _ns, _n, _os, _sh, _sp, _b
"""


# ------------------------------------------------------------------------------------------- execution

def run_tests(source: str, tests: str, timeout: float = 3.0) -> dict:
  """Runs `source` then `tests` in a fresh interpreter (`python -I`, empty temp cwd, memory/CPU/output-size
  limits, the guard above) killed with its children after `timeout` seconds. A pass needs a clean exit AND a
  random token the harness prints after the tests: a function that calls sys.exit(0) or os._exit(0) fails.
  status: pass | fail | syntax_error | timeout."""
  try:
    ast.parse(source)
  except SyntaxError as e:
    return {'status': 'syntax_error', 'detail': f'{e.msg} (line {e.lineno})'}
  token = secrets.token_hex(16)
  program = (_HARNESS.format(cpu=math.ceil(timeout) + 1) + source + '\n\n' + tests +
             f'\n\n_so.flush()\n_w(1, b"\\n{token}\\n")\n')
  # output goes to files under the 1 MB file-size limit, not to pipes read into this process's memory
  with tempfile.TemporaryDirectory() as d, open(os.path.join(d, '.out'), 'w+b') as out, \
       open(os.path.join(d, '.err'), 'w+b') as err:
    p = subprocess.Popen([sys.executable, '-I', '-c', program], cwd=d, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=err, start_new_session=True,
                         env={'PATH': os.environ.get('PATH', ''), 'PYTHONHASHSEED': '0'})
    try:
      p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pass
    try:  # the whole session, always: the function may have left children running
      os.killpg(p.pid, 9)
    except ProcessLookupError:
      pass
    rc = p.wait()
    tail = lambda f: (f.seek(max(0, f.seek(0, 2) - 4096)), f.read().decode('utf-8', 'replace'))[1]
    stdout, stderr = tail(out), tail(err)
  if rc == -9 and token not in stdout:
    return {'status': 'timeout', 'detail': f'killed after {timeout}s'}
  if rc == 0 and token in stdout:
    return {'status': 'pass', 'detail': ''}
  last = (stderr.strip().splitlines() or [f'exit code {rc}' if rc else 'exited before its tests finished'])[-1]
  return {'status': 'fail', 'detail': last[:200]}


# ------------------------------------------------------------------------------------------------ checks

def balanced(line: str) -> bool:
  """Brackets of one line of Python close in order (string literals skipped)."""
  pairs, stack, quote, i = {')': '(', ']': '[', '}': '{'}, [], None, 0
  while i < len(line):
    c = line[i]
    if quote:
      if c == '\\':
        i += 1
      elif c == quote:
        quote = None
    elif c in '"\'':
      quote = c
    elif c == '#':
      break
    elif c in '([{':
      stack.append(c)
    elif c in pairs and (not stack or stack.pop() != pairs[c]):
      return False
    i += 1
  return not stack


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(' \t'))


def extract_function(text: str) -> str:
  """The first top-level definition of `text`: its header line and every line up to the next line that
  starts at column 0 (or the end)."""
  lines = text.split('\n')
  head = next((i for i, s in enumerate(lines) if s.lstrip().startswith(('def ', 'class '))), 0)
  base = _indent(lines[head])
  out = [lines[head]]
  for s in lines[head + 1:]:
    if s.strip() and _indent(s) <= base:
      break
    out.append(s)
  return '\n'.join(out).rstrip() + '\n'


def parses(src: str) -> bool:
  try:
    ast.parse(src)
    return True
  except (SyntaxError, ValueError):
    return False


def _has_body(fn_src: str) -> bool:
  try:
    node = ast.parse(fn_src).body[0]
  except (SyntaxError, ValueError, IndexError):
    return False
  body = [b for b in getattr(node, 'body', []) if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
  return any(not isinstance(b, ast.Pass) for b in body)


def code_suite(be: Backend, max_new: int = 96, timeout: float = 3.0) -> dict:
  """Greedy completions of the fixed code prompts, scored per category (each in [0, 1])."""
  sp = SampleParams(temperature=0.0)

  def run(prompts, n):
    ids = [be.crop(be.tok.encode(p), 1)[0] for p in prompts]
    return complete(be, ids, n, sp)

  cats, details = {}, {}
  outs = run(BRACKETS, 24)
  ok = [balanced((p + o).split('\n')[0]) for p, o in zip(BRACKETS, outs)]
  cats['bracket_completion'], details['bracket_completion'] = mean(ok), _items(BRACKETS, outs, ok)
  prompts = [p for p, _ in KEYWORDS]
  outs = run(prompts, 8)
  ok = [o.startswith(k) for (_, k), o in zip(KEYWORDS, outs)]
  cats['keyword_completion'], details['keyword_completion'] = mean(ok), _items(prompts, outs, ok)
  outs = run(INDENT, 32)
  ok = []
  for p, o in zip(INDENT, outs):
    first = next((s for s in o.split('\n') if s.strip()), '')
    ok.append(bool(first) and _indent(first) > _indent(p.rstrip('\n').split('\n')[-1]))
  cats['indentation'], details['indentation'] = mean(ok), _items(INDENT, outs, ok)
  outs = run(DOCSTRINGS, 64)
  ok, funcs = [], []
  for p, o in zip(DOCSTRINGS, outs):
    doc, closed, _ = o.partition('"""')
    src = p + doc + '"""\n' + ' ' * (_indent(p.split('\n')[1]) if '\n' in p else 4) + 'pass\n'
    ok.append(bool(closed) and bool(doc.strip()) and parses(src))
  cats['docstring'], details['docstring'] = mean(ok), _items(DOCSTRINGS, outs, ok)
  outs = run(FUNCTIONS, max_new)
  fns = [extract_function(p + o) for p, o in zip(FUNCTIONS, outs)]
  ok = [parses(f) and _has_body(f) for f in fns]
  funcs += zip(FUNCTIONS, fns)
  cats['function_completion'], details['function_completion'] = mean(ok), _items(FUNCTIONS, outs, ok)
  prompts = [p for p, _ in EXEC]
  outs = run(prompts, max_new)
  fns = [extract_function(p + o) for p, o in zip(prompts, outs)]
  funcs += zip(prompts, fns)
  results = [run_tests(f, t, timeout) for f, (_, t) in zip(fns, EXEC)]
  cats['execution'] = mean([r['status'] == 'pass' for r in results])
  details['execution'] = [{'prompt': p, 'function': f, **r} for p, f, r in zip(prompts, fns, results)]
  # only code the model wrote counts: a prompt whose completion left the function empty is not valid syntax
  valid = [parses(f) and f.strip() != p.strip() for p, f in funcs]
  cats['syntax_validity'] = mean(valid)
  details['syntax_validity'] = [{'function': f, 'ok': v} for (_, f), v in zip(funcs, valid)]
  cats = {k: cats[k] for k in CODE_CATEGORIES}
  return {'categories': cats, 'overall': mean(list(cats.values())), 'details': details}


def mean(xs) -> float:
  return float(np.mean([float(x) for x in xs])) if len(xs) else 0.0


def _items(prompts, outs, ok) -> list[dict]:
  return [{'prompt': p, 'completion': o, 'ok': bool(k)} for p, o, k in zip(prompts, outs, ok)]
