"""python_instruct (data.instruct): the SFT set made from the standard library's sources. One build of the real
set per module (a few seconds), one more in a subprocess for determinism; the construction rules on a fake
two-file standard library."""
import ast
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from minillm_jax.config import UserError
from minillm_jax.data import instruct, template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPLAIN = 'Explain what this Python function does:\n\n'


@pytest.fixture(scope='module')
def built():
  """(train, val, info, {write source: relative path}) from a single scan of the standard library."""
  scans = []
  real = instruct._functions

  def spy():
    scans.append(real())
    return scans[-1]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(instruct, '_functions', spy)
    train, val, info = instruct.build()
  return train, val, info, {w[1]['content']: rel for rel, w, _ in scans[0][0]}


def _digest(train, val, info) -> str:
  return hashlib.sha256(json.dumps([train, val, info], sort_keys=True).encode()).hexdigest()


def test_deterministic_across_processes(built):
  # another process with another str hash seed: nothing may depend on set or dict order
  code = ('import hashlib, json; from minillm_jax.data import instruct; '
          'print(hashlib.sha256(json.dumps(list(instruct.build()), sort_keys=True).encode()).hexdigest())')
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, 'PYTHONHASHSEED': '12345'}, check=False)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == _digest(*built[:3])
  assert instruct.fingerprint() == instruct.fingerprint()


def test_conversations_well_formed(built):
  train, val, _, _ = built
  for convs in (train, val):
    for i, conv in enumerate(convs):
      assert [m['role'] for m in conv] == ['user', 'assistant']
      assert all(isinstance(m['content'], str) and m['content'].strip() for m in conv)
      # exactly the two turns' markers: no content carries template marker text
      text = template.render_template(conv, add_generation_prompt=False)
      assert text.endswith(template.END) and text.count(template.END) == 2
      user, reply = conv[0]['content'], conv[1]['content']
      if user.startswith('Write '):
        name = re.match(r'Write (?:a|an async) Python function `(\w+)\(|Write the (?:async )?method `\w+\.(\w+)\(',
                        user)
        fn = ast.parse(reply).body
        assert len(fn) == 1 and fn[0].name in name.groups() and ast.get_docstring(fn[0])
        assert reply == reply.rstrip() and '```' not in reply
      else:
        assert user.startswith(EXPLAIN)
        fn = ast.parse(user[len(EXPLAIN):]).body
        assert len(fn) == 1 and isinstance(fn[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(fn[0]) is None
        assert reply == ' '.join(reply.split())  # one normalized paragraph
        # right after the write pair of the same function, whose prompt ends with the same summary
        assert i > 0 and convs[i - 1][0]['content'].endswith(f'`: {reply}')
        assert convs[i - 1][1]['content'].startswith(('def ', 'async def ', '@'))


def test_no_function_or_file_on_both_sides(built):
  train, val, _, file_of = built
  write = [{c[1]['content'] for c in s if c[0]['content'].startswith('Write ')} for s in (train, val)]
  code = [{c[0]['content'] for c in s if c[0]['content'].startswith(EXPLAIN)} for s in (train, val)]
  assert write[0] and write[1] and not write[0] & write[1]
  assert code[0] and code[1] and not code[0] & code[1]
  n_write = sum(c[0]['content'].startswith('Write ') for c in train + val)
  assert n_write == len(write[0]) + len(write[1])  # no source twice on one side either
  files = [{file_of[src] for src in w} for w in write]
  assert files[0] and files[1] and not files[0] & files[1]


def test_split_sizes_and_counts(built):
  train, val, info, file_of = built
  assert 0.02 <= len(val) / (len(train) + len(val)) <= 0.3
  for side, convs in (('train', train), ('val', val)):
    c = info[side]
    assert c['pairs'] == len(convs) == c['write'] + c['explain']
    assert c['write'] == c['functions'] == sum(m[0]['content'].startswith('Write ') for m in convs)
  assert info['train']['functions'] + info['val']['functions'] == info['functions'] == len(file_of)
  assert info['train']['files'] + info['val']['files'] == len(set(file_of.values())) <= info['files']


# ---- the rules, on a fake standard library ----

A = '''"""Module a: one function of each kind the rules keep or drop."""


def add(a, b=1):
  """Return the sum of
  a and b.

  Longer description that is not part of the summary.
  """

  return a + b


def _private(x):
  """Return x unchanged, but privately."""
  return x


def stub(x):
  """Do the thing described right here."""
  raise NotImplementedError


def sig(x):
  """sig(x) -> int"""
  return 1


class Box:
  """A box."""

  @staticmethod
  def make(size):
    """Make a new box of the given size."""
    return Box()
'''
B = A.split('\n\n\ndef _private')[0] + '''


async def twice(x):
  """Wait for x twice, then return it."""
  await x
  return await x
'''


def _fake(monkeypatch, files):
  monkeypatch.setattr(instruct, '_stdlib_raw', lambda: [(k, v.encode()) for k, v in files.items()])


def test_rules_on_fake_stdlib(monkeypatch):
  _fake(monkeypatch, {'a.py': A, 'b.py': B})
  train, val, info = instruct.build()
  convs = train + val
  prompts = [c[0]['content'] for c in convs]
  assert info['functions'] == 3  # add, Box.make, twice: b.py's copy of add, _private, stub and sig are dropped
  assert prompts[0] == 'Write a Python function `add(a, b=1)`: Return the sum of a and b.'
  assert prompts[1] == EXPLAIN + 'def add(a, b=1):\n  return a + b'
  assert convs[1][1]['content'] == 'Return the sum of a and b.'
  assert prompts[2] == 'Write the method `Box.make(size)`: Make a new box of the given size.'
  assert convs[2][1]['content'].startswith('@staticmethod\ndef make(size):\n  """Make')
  assert prompts[4] == 'Write an async Python function `twice(x)`: Wait for x twice, then return it.'
  assert len(convs) == 6 and train and val
  assert {tuple(map(str, c)) for c in train}.isdisjoint({tuple(map(str, c)) for c in val})


def test_val_files_fallback():
  files = [f'f{i}.py' for i in range(10)]
  pairs = dict.fromkeys(files, 2)
  # these names hash to 0.137 (f5), 0.147 (f2), 0.172 (f3) and above
  assert instruct._val_files(files, pairs, 0.25) == {'f2.py', 'f3.py', 'f5.py'}
  # nothing hashes below: the last files until val holds the fraction of pairs
  assert instruct._val_files(files, pairs, 0.0) == {'f9.py'}
  assert instruct._val_files(files, pairs, 0.13) == {'f8.py', 'f9.py'}
  assert instruct._val_files(files, pairs, 1.0) == set(files[1:])  # everything would: the first file trains


def test_no_sources_is_a_user_error(monkeypatch):
  _fake(monkeypatch, {})
  with pytest.raises(UserError, match='pyc only'):
    instruct.build()


def test_fingerprint_follows_the_sources(monkeypatch):
  _fake(monkeypatch, {'a.py': A})
  fp = instruct.fingerprint()
  assert re.fullmatch(r'[0-9a-f]{64}', fp) and fp == instruct.fingerprint()
  _fake(monkeypatch, {'a.py': A + '\n'})
  assert instruct.fingerprint() != fp
