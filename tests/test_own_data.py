"""Your own data: source code files in `local`, `mixed` with your code and books (data.code_path,
data.books_path), an explicit validation set (data.val_path), and binary files skipped with counts."""
import os

import pytest
from conftest import run_module
from test_bad_inputs import PNG

from minillm_jax import config as config_lib
from minillm_jax.config import ConfigError, UserError
from minillm_jax.data import corpora, prepare

CODE = {'a.py': 'def add(a, b):\n    return a + b\n' * 20, 'b.js': 'function f(x) { return x * 2; }\n' * 20,
        'c.rs': 'fn main() { println!("hi"); }\n' * 20, 'notes.md': '# notes\nsome words here\n' * 20}
BOOKS = {'one.txt': 'It was a dark and stormy night. ' * 200, 'two.txt': 'Call me Ishmael. ' * 300}


def _tree(root, files: dict) -> str:
  os.makedirs(root, exist_ok=True)
  for name, text in files.items():
    with open(os.path.join(root, name), 'wb') as f:
      f.write(text if isinstance(text, bytes) else text.encode())
  return str(root)


def _cfg(tmp, **data):
  cfg = config_lib.default_config()
  cfg.model.block_size = 16
  cfg.data.update(cache_dir=os.path.join(tmp, 'cache'), **data)
  return config_lib.validate(cfg)


def test_source_code_files_are_documents_and_binaries_are_skipped_with_counts(tmp_path):
  src = _tree(tmp_path / 'src', {**CODE, 'logo.py': PNG})  # an image named .py
  c = corpora.local(src, 'text')
  assert sorted(c.docs) == sorted(CODE.values())
  assert c.info == {'files': 5, 'skipped_binary': 1, 'skipped_empty': 0}
  r = run_module('minillm_jax.prepare', '--config=configs/shakespeare_char.py', '--config.data.corpus=local',
                 f'--config.data.path={src}', f'--config.data.cache_dir={tmp_path}/cache',
                 '--config.model.block_size=16')
  assert r.returncode == 0 and 'skipped 1 binary file(s) of data.path' in r.stdout, r.stderr[-1500:]


def test_mixed_takes_your_code_and_books_at_the_code_weight(tmp_path):
  code, books = _tree(tmp_path / 'code', CODE), _tree(tmp_path / 'books', BOOKS)
  d = _cfg(str(tmp_path), corpus='mixed', code_path=code, books_path=books, code_weight=0.5).data
  c = corpora.load(d)
  assert set(c.docs) <= set(CODE.values()) | set(BOOKS.values())  # nothing embedded
  assert c.info['code'] == 'local' and c.info['books'] == 'local'
  assert abs(c.info['code_share'] - 0.5 / 1.5) < 0.2
  embedded = corpora.fingerprint(_cfg(str(tmp_path), corpus='mixed').data)
  assert corpora.fingerprint(d) != embedded  # another cache
  with pytest.raises(ConfigError, match='data.code_path and data.books_path are for data.corpus=mixed'):
    _cfg(str(tmp_path), corpus='local', path=code, code_path=code)
  with pytest.raises(UserError, match="data.books_path '/nowhere' does not exist"):
    corpora.load(_cfg(str(tmp_path), corpus='mixed', books_path='/nowhere').data)


def test_val_path_is_the_validation_set_as_it_is(tmp_path):
  train_dir = _tree(tmp_path / 'train', BOOKS)
  val_file = _tree(tmp_path / 'val', {'held_out.txt': 'The quick brown fox. ' * 50}) + '/held_out.txt'
  cfg = _cfg(str(tmp_path), corpus='local', path=train_dir, val_path=val_file, tokenizer='char')
  prep = prepare.prepare(cfg)
  m = prep.manifest
  assert m['split'] == 'val_path' and m['n_train_docs'] == 2 and m['n_val_docs'] == 1
  tok = prep.tokenizer()
  assert tok.decode(prep.tokens('val')[:-1].tolist()) == 'The quick brown fox. ' * 50  # as it is, no <|unk|>
  assert prepare.prepare(_cfg(str(tmp_path), corpus='local', path=train_dir, tokenizer='char')).dir != prep.dir
  with open(val_file, 'a') as f:
    f.write('more')
  assert prepare.cache_key(cfg)[0] != prep.dir.name  # another val file is another cache
