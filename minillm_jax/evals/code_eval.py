"""The code-generation suite of `evaluate`: fixed prompts per category, the checks that score greedy
completions, and the execution of generated functions against unit tests, each in the sandbox of
`minillm_jax.evals.sandbox` (never in-process)."""
from __future__ import annotations

import ast

import numpy as np

from minillm_jax.evals import sandbox
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


# ------------------------------------------------------------------------------------------- execution

def run_tests(source: str, tests: str, timeout: float = 3.0) -> dict:
  """Runs `source` then `tests` in the execution sandbox (`sandbox.run`: a fresh interpreter in its own
  session, user/network/pid namespaces where available, rlimits including no new processes, an audit hook that
  refuses process creation, signals to others, the network, native code and file access outside its temp dir),
  killed with everything it started after `timeout` seconds. A pass needs a clean exit AND a record only the
  harness can write after the tests returned: a function that exits early, prints a fake result or writes to the
  verdict pipe fails. status: pass | fail | syntax_error | timeout; executed runs also carry 'namespaces'."""
  try:
    ast.parse(source)
  except SyntaxError as e:
    return {'status': 'syntax_error', 'detail': f'{e.msg} (line {e.lineno})'}
  return sandbox.run(source, tests, timeout)


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


def code_suite(be: Backend, max_new: int = 96, timeout: float = 3.0, execute: bool = True) -> dict:
  """Greedy completions of the fixed code prompts, scored per category (each in [0, 1]). execute=False leaves out
  the execution category (no generated code runs; the overall score is the mean of the others)."""
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
  if execute:
    results = [run_tests(f, t, timeout) for f, (_, t) in zip(fns, EXEC)]
    cats['execution'] = mean([r['status'] == 'pass' for r in results])
  else:
    results = [{'status': 'skipped', 'detail': 'not executed: the model is not a run trained here (--execute)'}
               for _ in fns]
  details['execution'] = [{'prompt': p, 'function': f, **r} for p, f, r in zip(prompts, fns, results)]
  # only code the model wrote counts: a prompt whose completion left the function empty is not valid syntax
  valid = [parses(f) and f.strip() != p.strip() for p, f in funcs]
  cats['syntax_validity'] = mean(valid)
  details['syntax_validity'] = [{'function': f, 'ok': v} for (_, f), v in zip(funcs, valid)]
  cats = {k: cats[k] for k in CODE_CATEGORIES if k in cats}
  return {'categories': cats, 'overall': mean(list(cats.values())), 'details': details, 'executed': execute}


def mean(xs) -> float:
  return float(np.mean([float(x) for x in xs])) if len(xs) else 0.0


def _items(prompts, outs, ok) -> list[dict]:
  return [{'prompt': p, 'completion': o, 'ok': bool(k)} for p, o, k in zip(prompts, outs, ok)]
