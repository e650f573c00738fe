"""Chat: the template, history trimming, commands in-process, one-shot without a TTY, a scripted pty session
(/temp, /clear, Ctrl-C, /exit) and the torch backend from a .pt file."""
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_module
from test_sample import char_tok, config, make_pt, make_workdir, random_flat

from minillm_jax import chat
from minillm_jax.inference.backend import SampleParams
from minillm_jax.inference.jax_backend import JaxBackend
from torch_compat import convert

ENV = {**os.environ, 'NO_COLOR': '1', 'TERM': 'dumb', 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp('chat') / 'run', instruction_tuned=True)


def backend(instruction_tuned: bool) -> JaxBackend:
  tok = char_tok()
  c = config(tok.vocab_size, 'learned', 64)
  return JaxBackend(convert.load_into_flax(c, random_flat(c)), tok, {'instruction_tuned': instruction_tuned}, 'mem')


def test_template_is_the_documented_one():
  msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
          {'role': 'assistant', 'content': 'Hello!'}, {'role': 'user', 'content': 'Bye'}]
  assert chat.render_template(msgs) == ('<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>'
                                        '<|user|>Bye<|end|><|assistant|>')
  assert chat.render_plain(msgs[1:]) == 'User: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:'


def test_template_only_for_instruction_tuned_models_with_chat_tokens():
  assert backend(True).instruction_tuned and not backend(False).instruction_tuned
  be = backend(True)
  ids = be.tok.encode(chat.render_template([{'role': 'user', 'content': 'Hi'}]))
  assert ids[0] == be.tok.token_to_id('<|user|>') and ids[-1] == be.tok.token_to_id('<|assistant|>')
  stop, stop_ids = chat.Conversation(True).stops(be)
  assert stop == [] and be.tok.token_to_id('<|end|>') in stop_ids
  assert chat.Conversation(False).stops(be)[0] == list(chat.PLAIN_STOPS)


def test_history_drops_oldest_exchanges_with_a_notice():
  be = backend(True)
  out = io.StringIO()
  c = chat.Chat(be, SampleParams(temperature=0.0), 8, 0, system='sys', out=out)
  c.conv.exchanges = [('first question here', 'first answer'), ('second question', 'second answer')]
  ids, dropped = c.conv.prompt_ids(be, 'third', 8)
  assert dropped == 1 and len(ids) <= be.context - 8
  assert be.tok.decode(ids).startswith('<|system|>sys<|end|><|user|>second question')
  c.reply('third')
  assert 'dropped the 1 oldest exchange' in out.getvalue()
  assert [u for u, _ in c.conv.exchanges] == ['second question', 'third']
  ids, dropped = c.conv.prompt_ids(be, 'x' * 100, 8)  # one message past the context: cropped, room kept
  assert dropped == 2 and len(ids) == be.context - 8 and be.tok.decode(ids).endswith('xxx<|end|><|assistant|>')


def test_commands_in_process(tmp_path):
  out, err = io.StringIO(), io.StringIO()
  c = chat.Chat(backend(False), SampleParams(), 8, 0, out=out, err=err)
  assert c.command('/temp 0.25') and c.sp.temperature == 0.25
  assert c.command('/topk 7') and c.sp.top_k == 7
  assert c.command('/topp 0.5') and c.sp.top_p == 0.5
  assert c.command('/penalty 1.2') and c.sp.repetition_penalty == 1.2
  assert c.command('/len 5') and c.max_new == 5
  assert c.command('/topp 3') and c.sp.top_p == 0.5  # refused, unchanged
  assert c.command('/len zero') and c.max_new == 5
  reply = c.reply('to be')
  assert len(c.be.tok.encode(reply)) <= 5
  assert c.command(f'/save {tmp_path}/conv.json')
  saved = json.loads((tmp_path / 'conv.json').read_text())
  assert saved['messages'][0] == {'role': 'user', 'content': 'to be'} and saved['sampling']['top_k'] == 7
  assert c.command('/ckpt best')  # loaded from memory: refused with a message, session goes on
  assert c.command('/clear') and c.conv.exchanges == []
  assert not c.command('/exit')
  text, errors = out.getvalue(), err.getvalue()
  assert 'top_p=3.0 must be in (0, 1]' in errors and '/ckpt needs a run directory' in errors
  assert 'saved 2 messages' in text and 'error' not in text  # errors go to stderr, replies and notes to stdout


def test_ctrl_c_stops_a_reply_and_keeps_the_session(monkeypatch):
  def pieces(*args, **kw):
    yield 'Once upon'
    yield ' a time'
    raise KeyboardInterrupt  # what Ctrl-C raises between two decode steps

  out = io.StringIO()
  c = chat.Chat(backend(False), SampleParams(), 8, 0, out=out)
  monkeypatch.setattr(chat, 'stream', pieces)
  monkeypatch.setattr(sys, 'stdout', out)
  assert c.reply('tell me a story') == 'Once upon a time'
  assert '[interrupted]' in out.getvalue() and c.conv.exchanges == [('tell me a story', 'Once upon a time')]


def test_one_shot_prompt_without_a_tty(workdir):
  r = subprocess.run([sys.executable, '-m', 'minillm_jax.chat', f'--workdir={workdir}', '--prompt=Hello',
                      '--max_new_tokens=10', '--temperature=0'], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr
  assert 'Traceback' not in r.stderr and '\033[' not in r.stdout
  r2 = subprocess.run([sys.executable, '-m', 'minillm_jax.chat', f'--workdir={workdir}'], cwd=ROOT, env=ENV,
                      input='Hello\n/temp 0\n/exit\n', capture_output=True, text=True, timeout=300, check=False)
  assert r2.returncode == 0, r2.stderr
  assert 'temperature = 0.0' in r2.stdout


def test_one_shot_on_a_pt_file_runs_the_torch_backend(tmp_path):
  pt = make_pt(tmp_path / 'm.pt', instruction_tuned=True)
  r = subprocess.run([sys.executable, '-m', 'minillm_jax.chat', f'--ckpt={pt}', '--prompt=Hi', '--max_new_tokens=6'],
                     cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr
  r = subprocess.run([sys.executable, '-m', 'minillm_jax.chat', f'--ckpt={tmp_path}/none.pt', '--prompt=Hi'],
                     cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 2 and r.stderr.startswith('error:') and len(r.stderr.strip().splitlines()) == 1


class Pty:
  """Just enough of pexpect: a child on a pseudo-terminal, expect() on its output, send() lines."""

  def __init__(self, args):
    self.master, slave = pty.openpty()
    self.p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=ENV, close_fds=True)
    os.close(slave)
    self.buf = ''

  def expect(self, text: str, timeout: float = 240) -> str:
    end = time.time() + timeout
    while text not in self.buf:
      left = end - time.time()
      if left <= 0 or self.p.poll() is not None and not select.select([self.master], [], [], 0)[0]:
        raise AssertionError(f'{text!r} not seen; output so far:\n{self.buf[-2000:]}')
      if select.select([self.master], [], [], min(left, 1.0))[0]:
        try:
          self.buf += os.read(self.master, 4096).decode('utf-8', 'replace')
        except OSError:  # EIO: the child closed the terminal
          pass
    i = self.buf.index(text) + len(text)
    seen, self.buf = self.buf[:i], self.buf[i:]
    return seen

  def send(self, line: str):
    os.write(self.master, (line + '\r').encode())


def test_scripted_tty_session(workdir):
  s = Pty([sys.executable, '-m', 'minillm_jax.chat', f'--workdir={workdir}', '--max_new_tokens=8',
           '--history_file='])
  try:
    assert 'chat template' in s.expect('you> ')
    s.send('/temp 0.5')
    s.expect('temperature = 0.5')
    s.expect('you> ')
    s.send('Hello there')
    s.expect('assistant> ')
    s.expect('you> ')
    s.send('/clear')
    s.expect('(conversation cleared)')
    s.expect('you> ')
    time.sleep(0.5)  # readline prints the prompt before it waits; a signal in between waits for the next key
    s.p.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: a hint, the session goes on
    s.expect('/exit to quit')
    s.expect('you> ')
    s.send('/exit')
    assert s.p.wait(timeout=60) == 0
  finally:
    if s.p.poll() is None:
      s.p.kill()
    os.close(s.master)


def test_chat_help_lists_the_model_and_sampling_flags():
  """They are defined in generate; chat's --help (not only --helpfull) must show them."""
  out = run_module('minillm_jax.chat', '--help').stdout
  for flag in ('--workdir', '--ckpt', '--backend', '--step', '--temperature', '--top_p', '--prompt', '--system'):
    assert f'  {flag}:' in out, flag
