"""The chat template outside this project: an instruction-tuned run exported to Hugging Face renders and
tokenizes conversations in transformers exactly as render_template / render_ids do, and its generate stops
where our chat does; the .pt and HF exports load back into the torch backend still instruction-tuned.
Tiny model, CPU, offline."""
import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch_fixtures import FAMILIES, TOK, random_flat

from minillm_jax.chat import Chat
from minillm_jax.data import template
from minillm_jax.data.tokenizer import CHAT, train_bpe
from minillm_jax.inference.backend import SampleParams
from minillm_jax.inference.load import load
from torch_compat import convert, formats, hf

# system, two user and two assistant turns: newlines, spaces at the edges, tabs, unicode, code
MESSAGES = [
    {'role': 'system', 'content': '  You are terse.\n'},
    {'role': 'user', 'content': 'Add 2 and 3, ✓ 日本語 '},
    {'role': 'assistant', 'content': 'def add(a, b):\n    return a + b  # 5\n'},
    {'role': 'user', 'content': '\nAnd ünïcode \u2603?\t'},
    {'role': 'assistant', 'content': ' Sure: {"x": [1, 2]} \n\n'},
]
DOCS = [m['content'] for m in MESSAGES] * 20 + ['the quick brown fox jumps over the lazy dog\n'] * 30


@pytest.fixture(scope='module')
def tok():
  return train_bpe(DOCS, 300)  # this project's byte-level BPE, chat tokens at ids 2..5


@pytest.fixture(scope='module')
def run(tok, tmp_path_factory):
  """An instruction-tuned run (step-0 checkpoint) exported by torch_compat.export to .pt and to HF. Its weights
  answer every prompt with <|end|>: a final LayerNorm of scale 0 and bias e_0 makes every hidden state e_0,
  so the logits are column 0 of the tied embedding, highest at <|end|>."""
  from minillm_jax.training import checkpoint
  from torch_compat.export import export
  c = dataclasses.replace(FAMILIES['gpt2'], vocab_size=tok.vocab_size, block_size=128, max_positions=128)
  flat = random_flat(c)
  flat['ln_f.scale'][:] = 0
  flat['ln_f.bias'][:] = np.eye(c.d_model, dtype=np.float32)[0]
  flat['wte'][tok.token_to_id(template.END), 0] = 10.0
  d = tmp_path_factory.mktemp('chat_run')
  src = str(d / 'run')
  checkpoint.init_workdir(src, None, c, convert.load_into_flax(c, flat), tok.to_json_str(),
                          {'instruction_tuned': True})
  export(src, str(d / 'm.pt'), 'pt', 'latest')
  export(src, str(d / 'hf'), 'hf', 'latest')
  return {'c': c, 'flat': flat, 'pt': str(d / 'm.pt'), 'hf': str(d / 'hf')}


def _ids(out) -> list[int]:
  # transformers 5 returns a BatchEncoding by default (return_dict=True), 4.x a plain list of ids
  return list(out['input_ids'] if isinstance(out, Mapping) else out)


def test_transformers_chat_template_gives_our_ids(tok, run):
  from jinja2.exceptions import TemplateError
  from transformers import AutoTokenizer
  with open(os.path.join(run['hf'], 'tokenizer_config.json')) as f:
    assert json.load(f)['chat_template'] == template.hf_chat_template()
  t = AutoTokenizer.from_pretrained(run['hf'])
  assert t.chat_template == template.hf_chat_template()
  want = template.render_ids(tok, MESSAGES)[0]
  assert _ids(t.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=False)) == want
  assert want == tok.encode(template.render_template(MESSAGES, add_generation_prompt=False))
  prompt = template.render_ids(tok, MESSAGES[:-1], add_generation_prompt=True)[0]
  assert _ids(t.apply_chat_template(MESSAGES[:-1], tokenize=True, add_generation_prompt=True)) == prompt
  for gen, msgs in ((False, MESSAGES), (True, MESSAGES[:-1]), (True, MESSAGES[1:2])):  # also without a system
    text = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert text == template.render_template(msgs, add_generation_prompt=gen)
  assert t.decode(want) == template.render_template(MESSAGES, add_generation_prompt=False)
  assert set(CHAT) <= set(t.all_special_tokens)
  bad = [{'role': 'tool', 'content': '{}'}]
  with pytest.raises(TemplateError, match="unknown chat role 'tool'"):
    t.apply_chat_template(bad, tokenize=False)
  with pytest.raises(ValueError, match="unknown chat role 'tool'"):
    template.render_template(bad)


def test_transformers_generation_stops_where_our_chat_does(tok, run):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  end, eot = tok.token_to_id(template.END), tok.eot_id
  with open(os.path.join(run['hf'], 'config.json')) as f:
    assert json.load(f)['eos_token_id'] == [end, eot]
  t = AutoTokenizer.from_pretrained(run['hf'])
  assert (t.eos_token, t.eos_token_id, t.bos_token) == (template.END, end, '<|endoftext|>')
  m = AutoModelForCausalLM.from_pretrained(run['hf']).eval()
  assert m.generation_config.eos_token_id == [end, eot]
  be = load(ckpt=run['hf'], backend='torch')
  chat = Chat(be, SampleParams(temperature=0), 16, 0, system=MESSAGES[0]['content'])
  stop_ids = chat.conv.stops(be)[1]
  assert stop_ids == [end, eot]  # the stops of our chat are the eos list transformers stops at
  prompt = template.render_ids(tok, MESSAGES[:2], add_generation_prompt=True)[0]
  assert chat.conv.prompt_ids(be, MESSAGES[1]['content'], 16)[0] == prompt
  with torch.no_grad():
    out = m.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=eot)
  assert out[0].tolist() == prompt + [end]  # the reply ends at <|end|>, not after 16 tokens
  assert be.complete_ids([prompt], 16, SampleParams(temperature=0), stop_ids=stop_ids) == [[end]]


def test_pt_export_chats_with_the_template_on_the_torch_backend(tok, run):
  raw = torch.load(run['pt'], weights_only=True)
  assert raw['meta']['instruction_tuned'] is True and raw['meta']['step'] == 0
  be = load(ckpt=run['pt'], backend='torch')
  assert type(be).__name__ == 'TorchBackend' and be.instruction_tuned
  assert be.meta['instruction_tuned'] is True and be.step == 0 and be.tok.hash == tok.hash
  chat = Chat(be, SampleParams(temperature=0), 16, 0)
  assert chat.conv.templated
  assert chat.conv.prompt_ids(be, 'hi', 16)[0] == template.render_ids(
      tok, [{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)[0]


def test_hf_export_imports_back_instruction_tuned(tok, run):
  imp = formats.load_any(run['hf'])
  assert imp.meta['instruction_tuned'] is True and imp.tokenizer_json == tok.to_json_str()
  assert imp.model_config == run['c']
  assert load(ckpt=run['hf'], backend='torch').instruction_tuned


@pytest.mark.parametrize('case', ['not_tuned', 'no_chat_tokens'])
def test_other_exports_have_no_chat_template(case, tok, run, tmp_path):
  from transformers import AutoTokenizer
  c, d = run['c'], str(tmp_path / 'hf')
  if case == 'not_tuned':  # the same run without the meta flag
    tok_json, meta, eot = tok.to_json_str(), {'instruction_tuned': False, 'step': 0}, tok.eot_id
  else:  # flagged, but the tokenizer lacks the chat tokens: chat would not use the template either
    c = dataclasses.replace(FAMILIES['llama'])
    tok_json, meta, eot = TOK, {'instruction_tuned': True}, 3
  hf.save_hf(d, c, random_flat(c), tok_json, meta)
  with open(os.path.join(d, 'tokenizer_config.json')) as f:
    assert json.load(f) == {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': c.block_size,
                            'eos_token': '<|endoftext|>', 'bos_token': '<|endoftext|>'}
  with open(os.path.join(d, 'config.json')) as f:
    assert json.load(f)['eos_token_id'] == eot
  assert AutoTokenizer.from_pretrained(d).chat_template is None
