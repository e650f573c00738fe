"""Issue 29 (hardening): nothing the user owns is overwritten without asking, files from others are read as
data only, and the errors are one line naming the problem and the fix. Tiny models, CPU, offline."""
import dataclasses
import io
import json
import zipfile

import pytest
import torch
from conftest import run_module
from test_sample import char_tok, config, make_workdir
from test_sample import random_flat as sample_flat
from torch_fixtures import FAMILIES, random_flat

from minillm_jax import chat
from minillm_jax import config as config_lib
from minillm_jax.config import UserError
from minillm_jax.data import tokenizer as toklib
from minillm_jax.inference import text
from minillm_jax.inference.backend import Backend, SampleParams
from minillm_jax.inference.jax_backend import JaxBackend
from torch_compat import convert, formats, pt

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


# ------------------------------------------------------------------------ chat and generation (items 5, 13, 14)

class ScriptedBackend(Backend):
  """A backend without a model: each row's next token is next_id(the row's last token), so the continuation
  is known whatever the context, the chunking or the restarts when the cache fills."""
  name = 'scripted'

  def __init__(self, tok, context: int, next_id):
    super().__init__(tok, {}, context, 'scripted')
    self.next_id = next_id

  def prefill(self, prompts, budgets, sp, seed, stop_ids):
    return {'rows': [list(p) for p in prompts], 'gen': [[] for _ in prompts], 'budgets': list(budgets),
            'done': [b <= 0 for b in budgets], 'stop': set(stop_ids)}

  def decode(self, st, n_steps):
    for _ in range(n_steps):
      if all(st['done']) or self._full(st):
        break
      for i, (r, g) in enumerate(zip(st['rows'], st['gen'])):
        if not st['done'][i]:
          g.append(self.next_id((r + g)[-1]))
          st['done'][i] = len(g) >= st['budgets'][i] or g[-1] in st['stop']
    return st

  def _full(self, st):
    return max(len(r) + len(g) for r, g in zip(st['rows'], st['gen'])) >= self.context

  def poll(self, st):
    return [list(g) for g in st['gen']], list(st['done']), self._full(st)

  def nll(self, tokens_BxT):
    raise NotImplementedError


def test_streaming_yields_only_the_new_tokens(tmp_path):
  """Item 13: a streamed step costs what it adds (old: a copy of every token so far, every step)."""
  step = lambda t: (t * 7 + 3) % 50
  be = ScriptedBackend(None, 16, step)
  prompts, n = [[1, 2, 3], [4, 5, 6]], 300  # ~40 refills of the 16-token cache
  sizes = [[len(r) for r in delta] for delta in be.generate_ids(prompts, n, SampleParams(), chunk=1)]
  assert max(max(s) for s in sizes) == 1 and sum(s[0] for s in sizes) == n
  want = []
  for p in prompts:
    row, t = [], p[-1]
    for _ in range(n):
      t = step(t)
      row.append(t)
    want.append(row)
  assert be.complete_ids(prompts, n, SampleParams()) == want  # the complete result is unchanged
  stop = want[0][100]  # a stop token ends its row and is included, as before
  got = be.complete_ids(prompts[:1], n, SampleParams(), stop_ids=[stop])[0]
  assert got == want[0][:want[0].index(stop) + 1]


def chat_backend(instruction_tuned: bool = False) -> JaxBackend:
  tok = char_tok()
  c = config(tok.vocab_size, 'learned', 64)
  return JaxBackend(convert.load_into_flax(c, sample_flat(c)), tok, {'instruction_tuned': instruction_tuned}, 'mem')


def test_chat_len_is_bounded(tmp_path):
  """Item 13: /len 99999999 used to be taken (a reply that never returns); the limit is documented."""
  out, err = io.StringIO(), io.StringIO()
  c = chat.Chat(chat_backend(), SampleParams(), 8, 0, out=out, err=err)
  assert c.command('/len 99999999') and c.max_new == 8
  assert f'at most {chat.MAX_REPLY_TOKENS} tokens per reply' in err.getvalue()
  assert c.command(f'/len {chat.MAX_REPLY_TOKENS}') and c.max_new == chat.MAX_REPLY_TOKENS
  assert f'{chat.MAX_REPLY_TOKENS:,}' in chat.HELP
  w = make_workdir(tmp_path / 'run')
  r = run_module('minillm_jax.chat', f'--workdir={w}', '--prompt=hi', '--max_new_tokens=99999999')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith('error: --max_new_tokens=99999999: chat replies are at most')


def test_chat_save_never_replaces_a_file_unasked(tmp_path):
  """Item 5: /save PATH on an existing file keeps it and says how to replace it; /save! PATH replaces it."""
  out, err = io.StringIO(), io.StringIO()
  c = chat.Chat(chat_backend(), SampleParams(temperature=0.0), 4, 0, out=out, err=err)
  c.conv.exchanges = [('to be', 'or not')]
  mine = tmp_path / 'notes.txt'
  mine.write_text('my own notes\n')
  assert c.command(f'/save {mine}')
  assert mine.read_text() == 'my own notes\n'
  assert f'{mine} exists and was kept' in err.getvalue() and f'/save! {mine}' in err.getvalue()
  assert c.command(f'/save! {mine}')
  assert mine.read_text() == 'user: to be\n\nassistant: or not\n\n'
  assert c.command(f'/save {tmp_path / "new.txt"}') and (tmp_path / 'new.txt').exists()
  assert '/save! PATH' in chat.HELP


def test_chat_says_the_real_rule_for_a_long_prompt(capsys):
  """Item 14: a 58-token prompt is not 'longer than the context (64)'; the reply's room is what it exceeds."""
  c = chat.Chat(chat_backend(), SampleParams(temperature=0.0), 32, 0, out=io.StringIO(), err=io.StringIO())
  c.conv.prompt_ids(c.be, 'x' * 40, 32)
  err = capsys.readouterr().err
  n = len(c.be.tok.encode(c.conv.render([], 'x' * 40)))
  assert 32 < n < 64
  assert f'the prompt is {n} tokens, longer than the context (64) minus the 32 kept for new tokens; ' \
         'kept its last 32' in err


def test_unknown_characters_are_named_once():
  """Item 14: characters the char tokenizer lacks became <|unk|> silently."""
  err = io.StringIO()
  c = chat.Chat(chat_backend(), SampleParams(temperature=0.0), 2, 0, out=io.StringIO(), err=err)
  c.reply('to be \u00e9\u2211')
  assert "2 characters not in the tokenizer's vocabulary became <|unk|>: '\u00e9' '\u2211'" in err.getvalue()
  c.reply('\u00e9 again')
  assert err.getvalue().count('not in the tokenizer') == 1


def test_control_characters_never_reach_the_terminal(capsys):
  """Item 14: an ESC (or BEL, CR, ...) from the model or a pasted prompt is shown escaped, never sent raw."""
  tok = toklib.build_char(['ab \x1b[2J\x07\r\n\tz'])
  cycle = [tok.token_to_id(ch) for ch in '\x1b[2J\x07\r\n\tz']
  be = ScriptedBackend(tok, 64, lambda t: cycle[(cycle.index(t) + 1) % len(cycle)] if t in cycle else cycle[0])
  out = ''.join(text.stream(be, [tok.token_to_id('a')], 9, SampleParams(), stop_ids=[]))
  assert out == '\\x1b[2J\\x07\\x0d\n\tz'
  assert text.printable('ok\x9b31m\x7f') == 'ok\\x9b31m\\x7f'
  said = io.StringIO()
  c = chat.Chat(chat_backend(), SampleParams(), 2, 0, out=said, err=said)
  c.command('/nope\x1b]0;owned\x07')
  assert '\x1b' not in said.getvalue() and '\x07' not in said.getvalue() and '\\x1b]0;owned' in said.getvalue()


def test_a_quick_run_of_a_preset_is_not_refused_for_its_warmup(capsys):
  """Item 14: --config.train.steps=20 failed on every preset (warmup_steps 100 > 20); now warmup is a tenth."""
  cfg = config_lib.default_config()
  cfg.train.steps = 20
  assert config_lib.validate(cfg).optim.warmup_steps == 2
  assert 'note: optim.warmup_steps=100 exceeds train.steps=20; warming up over 2 steps' in capsys.readouterr().err
