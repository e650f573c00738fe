"""Issue 29 (hardening): nothing the user owns is overwritten without asking, files from others are read as
data only, and the errors are one line naming the problem and the fix. Tiny models, CPU, offline."""
import dataclasses
import json
import zipfile

import pytest
import torch
from conftest import run_module
from torch_fixtures import FAMILIES, random_flat

from minillm_jax import config as config_lib
from minillm_jax.config import UserError
from torch_compat import formats, pt

# ------------------------------------------------------------------------------ torch files (items 2, 4, 6, 12)


def _zip(path, entries: dict):
  with zipfile.ZipFile(path, 'w') as z:
    for name, data in entries.items():
      z.writestr(name, data)


def test_export_replaces_only_a_torch_archive(tmp_path):
  """Item 2: a .docx/.xlsx/.jar is a zip too; only a torch.save archive may be replaced by an export."""
  c = FAMILIES['tiny']
  flat = random_flat(c)
  for name, entries in (('report.docx', {'[Content_Types].xml': '<x/>', 'word/document.xml': '<w/>'}),
                        ('sheet.xlsx', {'[Content_Types].xml': '<x/>', 'xl/workbook.xml': '<w/>'}),
                        ('app.jar', {'META-INF/MANIFEST.MF': 'Manifest-Version: 1.0\n', 'a/B.class': 'x'}),
                        ('fake.pt', {'x/data.pkl': 'not really', 'notes.txt': 'two top folders'})):
    path = tmp_path / name
    _zip(path, entries)
    before = path.read_bytes()
    with pytest.raises(UserError, match=r'exists and is not a torch checkpoint; refusing to overwrite it') as e:
      pt.save_pt(str(path), c, flat, None, {})
    assert '\n' not in str(e.value)
    assert path.read_bytes() == before
  old = tmp_path / 'old.pt'  # an earlier torch.save file (any content) may be replaced
  torch.save({'x': torch.zeros(2)}, old)
  pt.save_pt(str(old), c, flat, None, {})
  assert formats.load_any(str(old)).model_config == c


def test_import_takes_no_paths_or_data_sources_from_the_file(tmp_path):
  """Item 4: an imported .pt's run config must not choose what a later `train --workdir` reads."""
  from torch_compat.import_ckpt import import_ckpt
  c = FAMILIES['tiny']
  cfg = config_lib.to_plain(config_lib.default_config())
  cfg['data'].update(corpus='local', path='/etc/passwd', cache_dir='/tmp/elsewhere', hub_name='evil/set',
                     tokenizer='hub:someone/tok')
  cfg['train'].update(init_from='/home/author/runs/base', steps=777)
  cfg['optim'].update(lr=3e-4)
  src = str(tmp_path / 'theirs.pt')
  pt.save_pt(src, c, random_flat(c), None, {'config': cfg, 'step': 5})
  msg = import_ckpt(src, str(tmp_path / 'run'))
  assert 'data settings and paths were not' in msg and 'data.path' in msg
  got = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert got['data'] == config_lib.to_plain(config_lib.default_config())['data']
  assert got['train']['init_from'] == ''
  assert got['train']['steps'] == 777 and got['optim']['lr'] == 3e-4  # harmless hyperparameters are kept
  assert got['model']['n_layer'] == c.n_layer


def _pickle_archive(path, pkl: bytes):
  """A torch.save-shaped zip around a hand-written pickle (never unpickled unsafely: the test only asks
  the weights-only loader, which must refuse it)."""
  _zip(path, {'a/data.pkl': pkl, 'a/version': '3\n', 'a/byteorder': 'little'})


@pytest.mark.parametrize('pkl', [
    b'\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.',   # os.system('true')
    b'\x80\x02cmymodule\nMyOrderedDict\nq\x00)Rq\x01.',                        # an OrderedDict subclass
    b'\x80\x02cbuiltins\neval\nq\x00X\x01\x00\x00\x001q\x01\x85q\x02Rq\x03.',  # eval('1')
], ids=['os.system', 'OrderedDict-subclass', 'eval'])
def test_pickled_globals_are_refused_as_code_never_as_corrupt(tmp_path, pkl):
  """Item 6: whatever torch's wording ('Unsupported global: GLOBAL x', 'Trying to load unsupported GLOBAL x'),
  the refusal says the file could run code and never points at weights_only=False."""
  path = tmp_path / 'evil.pt'
  _pickle_archive(path, pkl)
  with pytest.raises(UserError) as e:
    formats.load_any(str(path))
  msg = str(e.value)
  assert msg.startswith(f'refusing to load {path}: it holds pickled objects') and 'could run code' in msg
  assert 'weights_only' not in msg and 'corrupt' not in msg and '\n' not in msg and len(msg) < 300


def test_a_file_claiming_2000_layers_fails_fast(tmp_path):
  """Item 12: the tensors are checked against the file's config before any model is traced or built."""
  c = FAMILIES['tiny']
  src = str(tmp_path / 'big.pt')
  pt.save_pt(src, c, random_flat(c), None, {})
  ckpt = torch.load(src, weights_only=True)
  ckpt['model_config'] = dataclasses.replace(c, n_layer=2000).to_dict()
  torch.save(ckpt, src)
  r = run_module('torch_compat.import_ckpt', f'--src={src}', f'--workdir={tmp_path / "run"}', timeout=120)
  assert r.returncode == 2
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: checkpoint lacks tensor transformer.h.2.') and 'expected shape' in last
  assert not (tmp_path / 'run').exists()
