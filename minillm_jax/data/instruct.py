"""`python_instruct`: an embedded, offline instruction-tuning set made from the running interpreter's standard
library sources (the same files as the `python_code` corpus), the default data for supervised fine-tuning.

Each documented public function (top-level, or a method of a top-level public class) of at most 40 lines and
1200 characters gives two [user, assistant] conversations:
  - write: "Write a Python function `name(args)`: <docstring summary>" -> the function's source, docstring kept;
  - explain: "Explain what this Python function does:\\n\\n<source without its docstring>" -> the summary.
Identical sources are kept once, and train/val are split by source file (a hash of its path), so no function
and no file is on both sides. Deterministic: the same interpreter gives the same conversations, byte for byte.
"""
from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
import textwrap

from minillm_jax.config import UserError
from minillm_jax.data import template
from minillm_jax.data.corpora import _GENERATED, _MAX_BYTES, _MIN_BYTES, _sha, _stdlib_raw, decode

VERSION = 1  # bump when the construction changes: it is part of the prepare cache key

MAX_CHARS, MAX_LINES = 1200, 40  # longer functions would not fit a small model's context with their prompt
_FUNC = (ast.FunctionDef, ast.AsyncFunctionDef)
_SIGNATURE = re.compile(r'[\w.]+\(')  # 'name(a, b) -> list': a signature stub, not a sentence
_MARKERS = (*template.TAGS.values(), template.END)  # content with these would render as extra chat turns


def _summary(node: ast.AST) -> str | None:
  """The docstring's first paragraph on one line, when it reads as a sentence."""
  doc = ast.get_docstring(node)
  if not doc:
    return None
  s = ' '.join(doc.strip().split('\n\n')[0].split())
  if not 3 <= len(s) <= 300 or not s[0].isalpha() or len(s.split()) < 2 or s.endswith(':'):
    return None  # a summary ending in ':' introduces a list that the first paragraph cuts off
  return None if _SIGNATURE.match(s) else s


def _trivial(body: list[ast.stmt]) -> bool:
  """Only pass / ... / raise NotImplementedError after the docstring: an interface, nothing to learn."""
  for st in body[1:]:
    if isinstance(st, ast.Pass) or isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
      continue
    if isinstance(st, ast.Raise) and st.exc is not None and 'NotImplementedError' in ast.unparse(st.exc):
      continue
    return False
  return True


def _candidates(tree: ast.Module):
  """(class name or None, function node): public functions and public methods of public classes, in order."""
  for node in tree.body:
    if isinstance(node, _FUNC):
      yield None, node
    elif isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
      yield from ((node.name, m) for m in node.body if isinstance(m, _FUNC))


def _strip_docstring(src: str) -> str | None:
  """`src` (one function) without its docstring's lines and the blank lines around them; None when the result
  is not a function without a docstring (docstring on the def line, statements sharing its line...)."""
  fn = ast.parse(src).body[0]
  doc, rest = fn.body[0], fn.body[1]
  if doc.lineno == fn.lineno or rest.lineno <= doc.end_lineno:
    return None
  lines = src.split('\n')
  start, end = doc.lineno - 1, doc.end_lineno  # 0-based, end exclusive
  while start > fn.lineno and not lines[start - 1].strip():
    start -= 1
  while end < len(lines) and not lines[end].strip():
    end += 1
  out = '\n'.join(lines[:start] + lines[end:])
  try:
    new = ast.parse(out).body[0]
  except SyntaxError:
    return None
  return out if isinstance(new, _FUNC) and ast.get_docstring(new) is None else None


def _functions() -> tuple[list[tuple[str, list[dict], list[dict] | None]], int]:
  """([(relative path, write conversation, explain conversation or None), ...] in file then source order,
  number of files parsed). Functions whose source (or source without docstring) was seen before are dropped."""
  out, seen, n_files = [], set(), 0
  for rel, raw in _stdlib_raw():
    if not _MIN_BYTES <= len(raw) <= _MAX_BYTES or _GENERATED.search(raw[:1000].decode('utf-8', 'replace')):
      continue  # python_code's selection: no generated tables or data blobs
    text, bad = decode(raw)
    if bad:
      continue  # replacement characters would end up in the code
    text = text.replace('\r\n', '\n').replace('\r', '\n')  # so split('\n') numbers lines as ast does
    try:
      tree = ast.parse(text)
    except (SyntaxError, ValueError):
      continue
    n_files += 1
    lines = text.split('\n')
    for cls, node in _candidates(tree):
      first = min([node.lineno] + [d.lineno for d in node.decorator_list])  # keep @staticmethod, @property
      if (node.name.startswith('_') or node.end_lineno - first + 1 > MAX_LINES
          or (summary := _summary(node)) is None or _trivial(node.body)):
        continue
      # whole lines, not ast.get_source_segment: that one splits the whole file again for every call
      src = textwrap.dedent('\n'.join(lines[first - 1:node.end_lineno])).rstrip()
      if len(src) > MAX_CHARS or src in seen or any(m in src for m in _MARKERS):
        continue
      try:
        parsed = ast.parse(src).body
      except SyntaxError:  # a docstring line indented less than the method: dedent cannot move it
        continue
      if len(parsed) != 1 or not isinstance(parsed[0], _FUNC):
        continue
      code = _strip_docstring(src)
      if code in seen:  # same code, another docstring: it would be on both sides as explain prompts
        continue
      seen.update(x for x in (src, code) if x)
      asyn = 'async ' if isinstance(node, ast.AsyncFunctionDef) else ''
      sig = f'{node.name}({ast.unparse(node.args)})'
      ask = (f'Write the {asyn}method `{cls}.{sig}`' if cls else
             f'Write {"an async" if asyn else "a"} Python function `{sig}`')
      write = [{'role': 'user', 'content': f'{ask}: {summary}'}, {'role': 'assistant', 'content': src}]
      explain = None if code is None else [
          {'role': 'user', 'content': f'Explain what this Python function does:\n\n{code}'},
          {'role': 'assistant', 'content': summary}]
      out.append((rel, write, explain))
  return out, n_files


def _unit(rel: str) -> float:
  return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 2**32


def _val_files(files: list[str], pairs: dict[str, int], val_fraction: float) -> set[str]:
  """Files (sorted, each with pairs) whose path hashes below val_fraction; when that leaves a side empty, the
  last files in sorted order until val holds val_fraction of the pairs (the first file always trains)."""
  val = {f for f in files if _unit(f) < val_fraction}
  if val and len(val) < len(files):
    return val
  val, n, total = set(), 0, sum(pairs.values())
  for f in reversed(files[1:]):
    val.add(f)
    n += pairs[f]
    if n >= val_fraction * total:
      break
  return val


def build(val_fraction: float = 0.1) -> tuple[list[list[dict]], list[list[dict]], dict]:
  """(train conversations, val conversations, info). Conversations are [user, assistant] message lists in file
  then source order, write before explain; info counts files, functions and pairs, overall and per split."""
  fns, n_files = _functions()
  pairs: dict[str, int] = {}
  for rel, _, explain in fns:
    pairs[rel] = pairs.get(rel, 0) + 1 + (explain is not None)
  if len(pairs) < 2:
    stdlib = sysconfig.get_paths()['stdlib']
    raise UserError(f'python_instruct needs documented functions in two or more standard library files; found '
                    f'{len(pairs)} file(s) with any in {stdlib} (a Python that ships .pyc only?): use a Python '
                    'install with its .py sources, or SFT data of your own')
  val_files = _val_files(sorted(pairs), pairs, val_fraction)
  splits = {'train': [], 'val': []}
  info = {'stdlib': sysconfig.get_paths()['stdlib'], 'files': n_files, 'functions': len(fns)}
  for side in splits:
    info[side] = {'files': 0, 'functions': 0, 'write': 0, 'explain': 0}
  for rel, write, explain in fns:
    side = 'val' if rel in val_files else 'train'
    splits[side] += [write] + ([explain] if explain else [])
    info[side]['functions'] += 1
    info[side]['write'] += 1
    info[side]['explain'] += explain is not None
  for side, convs in splits.items():
    info[side]['files'] = len(val_files) if side == 'val' else len(pairs) - len(val_files)
    info[side]['pairs'] = len(convs)
  return splits['train'], splits['val'], info


def fingerprint() -> str:
  """Cheap content hash of what build() reads: the construction's version, the Python version (ast.unparse
  writes the signatures) and the standard library files' names and bytes."""
  return _sha(VERSION, 'python_instruct', list(sys.version_info[:2]),
              *(x for rel, raw in _stdlib_raw() for x in (rel, raw)))
