"""The OpenAI-compatible HTTP API over a Scheduler (inference.scheduler): request validation, responses, SSE.

  POST /v1/completions        prompt (a string, or a list of one string) -> text
  POST /v1/chat/completions   messages -> the assistant's reply (the chat template for instruction-tuned models,
                              else the plain transcript; the same prompts and stops as minillm_jax.chat)
  GET  /v1/models, GET /health   (both also report the checkpoint's step and whether it is instruction-tuned)
  GET  /                        the chat page (web/chat.html: one static file, streams over the chat endpoint)

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a bad request (unknown field,
bad value, malformed JSON, a prompt or max_tokens beyond the context), 401 without the API key, 404/405 for
other paths and methods, 413 for a body over MAX_BODY, 429 when the queue is full. A failing request never takes
the server down. With an API key every endpoint needs it except the page itself, which holds no data and asks
for the key.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.resources
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from minillm_jax.config import UserError
from minillm_jax.data.template import END, PLAIN_STOPS, render_plain, render_template
from minillm_jax.inference.backend import Backend, SampleParams
from minillm_jax.inference.scheduler import Job, QueueFull, Scheduler

COMMON = {'model', 'max_tokens', 'temperature', 'top_p', 'stop', 'stream', 'stream_options', 'seed', 'n',
          'top_k', 'repetition_penalty', 'user'}
FIELDS = {'completions': COMMON | {'prompt'}, 'chat': COMMON | {'messages', 'max_completion_tokens'}}
MAX_STOPS = 4  # as OpenAI's API
MAX_BODY = 4 << 20  # bytes: far more than any context of these models holds, yet a cap on what one request costs
# The page may load nothing from elsewhere (it must work offline) and talk only to this server; inline script
# and style are its own (one file, no build step).
PAGE_HEADERS = {'Content-Security-Policy': "default-src 'none'; script-src 'unsafe-inline'; style-src "
                "'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
                'X-Content-Type-Options': 'nosniff', 'Cache-Control': 'no-cache'}


def chat_page() -> str:
  return importlib.resources.files('minillm_jax.inference').joinpath('web/chat.html').read_text('utf-8')


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, type_: str = 'invalid_request_error',
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.type, 'param': self.param, 'code': self.code}}

  def response(self) -> JSONResponse:
    return JSONResponse(self.body(), status_code=self.status)


@dataclasses.dataclass(frozen=True)
class Defaults:
  """What a request leaves out: the served model's sampling (run config, then the command's flags)."""
  sp: SampleParams
  max_tokens: int
  stop: tuple[str, ...] = ()


def _number(body: dict, name: str, kind: type, default=None):
  v = body.get(name)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
    raise ApiError(400, f'{name} must be {"an integer" if kind is int else "a number"}, not {v!r}', name)
  return kind(v)


def chat_prompt(be: Backend, messages) -> tuple[str, list[str], list[int], bool]:
  """(prompt text, stop strings, stop ids, strip the reply's leading space) for chat messages, as chat.py's
  Conversation renders them: the template for an instruction-tuned model, else the plain transcript."""
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, 'messages must be a non-empty list of {"role", "content"} objects', 'messages')
  msgs = []
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or set(m) - {'role', 'content', 'name'} or m.get('role') not in (
        'system', 'user', 'assistant'):
      raise ApiError(400, f'messages[{k}] must be {{"role": "system"|"user"|"assistant", "content": str}}',
                     'messages')
    content = m.get('content')
    if isinstance(content, list):  # content parts: text only
      if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str) for p in content):
        raise ApiError(400, f'messages[{k}].content: only text parts are supported', 'messages')
      content = ''.join(p['text'] for p in content)
    if not isinstance(content, str):
      raise ApiError(400, f'messages[{k}].content must be a string', 'messages')
    msgs.append({'role': m['role'], 'content': content})
  if be.instruction_tuned:
    return render_template(msgs), [], [be.tok.token_to_id(END), be.tok.eot_id], False
  return render_plain(msgs), list(PLAIN_STOPS), [be.tok.eot_id], True


def parse(body, kind: str, be: Backend, d: Defaults, max_n: int) -> dict:
  """A validated request: {'job': Job (emit unset), 'prompt_tokens', 'stream', 'usage_in_stream', 'model',
  'lstrip'}; ApiError(400) naming the field otherwise."""
  if not isinstance(body, dict):
    raise ApiError(400, 'the request body must be a JSON object')
  unknown = sorted(set(body) - FIELDS[kind])
  if unknown:
    raise ApiError(400, f'unknown or unsupported field {unknown[0]!r}', unknown[0], code='unknown_field')
  if kind == 'completions':
    prompt = body.get('prompt')
    if isinstance(prompt, list) and len(prompt) == 1:
      prompt = prompt[0]
    if not isinstance(prompt, str):
      raise ApiError(400, 'prompt must be a string (or a list of one string)', 'prompt')
    stops, stop_ids, lstrip = [], [be.tok.eot_id], False
    ids = be.tok.encode(prompt) if prompt else [be.tok.eot_id]  # an empty prompt starts a new document
  else:
    prompt, stops, stop_ids, lstrip = chat_prompt(be, body.get('messages'))
    ids = be.tok.encode(prompt)
  stop = body.get('stop')
  stop = [stop] if isinstance(stop, str) else stop
  if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                           or not all(isinstance(s, str) for s in stop)):
    raise ApiError(400, f'stop must be a string or a list of at most {MAX_STOPS} strings', 'stop')
  stops += list(d.stop) if stop is None else stop
  if len(ids) >= be.context:
    raise ApiError(400, f'the prompt is {len(ids)} tokens; this model\'s context is {be.context} tokens, which '
                   'must also hold at least one new token', 'messages' if kind == 'chat' else 'prompt',
                   code='context_length_exceeded')
  room = be.context - len(ids)
  name = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
  max_tokens = _number(body, name, int)
  if max_tokens is None:
    max_tokens = min(d.max_tokens, room)
  elif max_tokens < 1:
    raise ApiError(400, f'{name}={max_tokens} must be >= 1', name)
  elif max_tokens > room:
    raise ApiError(400, f'this model\'s context is {be.context} tokens; you asked for {len(ids) + max_tokens} '
                   f'({len(ids)} in the prompt, {max_tokens} to generate)', name, code='context_length_exceeded')
  n = _number(body, 'n', int, 1)
  if not 1 <= n <= max_n:
    raise ApiError(400, f'n={n} must be in [1, {max_n}] (--max_batch)', 'n')
  sp = d.sp
  try:
    top_k = _number(body, 'top_k', int, sp.top_k)
    sp = dataclasses.replace(sp, temperature=_number(body, 'temperature', float, sp.temperature),
                             top_p=_number(body, 'top_p', float, sp.top_p), top_k=top_k or None,
                             repetition_penalty=_number(body, 'repetition_penalty', float,
                                                        sp.repetition_penalty)).check()
  except UserError as e:
    raise ApiError(400, str(e), str(e).split('=')[0]) from None
  seed = _number(body, 'seed', int)
  if seed is not None and not 0 <= seed < 2 ** 63:
    raise ApiError(400, f'seed={seed} must be in [0, 2^63)', 'seed')
  stream = body.get('stream') or False
  opts = body.get('stream_options') or {}
  if not isinstance(stream, bool) or not isinstance(opts, dict) or set(opts) - {'include_usage'}:
    raise ApiError(400, 'stream must be true or false; stream_options may hold include_usage only', 'stream')
  model = body.get('model')
  if model is not None and not isinstance(model, str):
    raise ApiError(400, 'model must be a string', 'model')
  job = Job(ids, max_tokens, sp, emit=None, n=n, seed=seed if seed is None else seed % 2 ** 31,
            stop=tuple(stops), stop_ids=tuple(stop_ids))
  return {'job': job, 'prompt_tokens': len(ids), 'stream': stream, 'model': model, 'lstrip': lstrip,
          'usage_in_stream': bool(opts.get('include_usage'))}


async def _events(request: Request, job: Job, queue: asyncio.Queue) -> AsyncIterator[tuple]:
  """The job's events until all its choices are done; cancels the job when the client goes away."""
  left = job.n
  try:
    while left:
      try:
        ev = await asyncio.wait_for(queue.get(), 0.5)
      except TimeoutError:
        if await request.is_disconnected():
          return
        continue
      if ev[0] == 'error':
        raise ApiError(500, f'generation failed: {ev[1]}', type_='server_error')
      left -= ev[0] == 'done'
      yield ev
  finally:
    if left:
      job.cancel()


def create_app(be: Backend, sched: Scheduler, model_name: str, defaults: Defaults,
               api_key: str | None = None) -> Starlette:
  started = int(time.time())
  about = {'step': None if be.step is None else int(be.step), 'instruction_tuned': be.instruction_tuned, 'context': be.context}
  page_html = chat_page()

  async def health(request: Request):
    return JSONResponse({'status': 'ok', 'model': model_name, **about, **sched.stats})

  async def models(request: Request):
    return JSONResponse({'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': started,
                                                     'owned_by': 'minillm_jax', **about}]})

  async def page(request: Request):
    return HTMLResponse(page_html, headers=PAGE_HEADERS)

  async def complete(request: Request, kind: str):
    raw = await request.body()
    if len(raw) > MAX_BODY:
      return ApiError(413, f'the request body is {len(raw)} bytes; at most {MAX_BODY}').response()
    try:
      body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      return ApiError(400, f'malformed JSON: {e}').response()
    try:
      req = parse(body, kind, be, defaults, sched.max_batch)
    except ApiError as e:
      return e.response()
    job, loop, queue = req['job'], asyncio.get_running_loop(), asyncio.Queue()

    def emit(ev: tuple):  # from the scheduler thread
      try:
        loop.call_soon_threadsafe(queue.put_nowait, ev)
      except RuntimeError:  # the loop is closed: the server is shutting down
        job.cancel()
    job.emit = emit
    try:
      sched.submit(job)
    except QueueFull as e:
      return ApiError(429, str(e), type_='rate_limit_error', code='rate_limit_exceeded').response()
    chat = kind == 'chat'
    head = {'id': f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex[:24]}', 'created': int(time.time()),
            'model': req['model'] or model_name}
    events = _events(request, job, queue)
    lstrip = [req['lstrip']] * job.n  # after the transcript's "Assistant:", drop the reply's leading space

    def text_of(i: int, piece: str) -> str:
      if lstrip[i]:
        piece = piece.lstrip()
        lstrip[i] = not piece
      return piece

    def usage(completion: int) -> dict:
      return {'prompt_tokens': req['prompt_tokens'], 'completion_tokens': completion,
              'total_tokens': req['prompt_tokens'] + completion}

    if not req['stream']:
      texts, reasons, tokens = [''] * job.n, [None] * job.n, 0
      try:
        async for ev in events:
          if ev[0] == 'text':
            texts[ev[1]] += text_of(ev[1], ev[2])
          else:
            reasons[ev[1]], tokens = ev[2], tokens + ev[3]
      except ApiError as e:
        return e.response()
      if None in reasons:  # the client went away
        return JSONResponse({}, status_code=499)
      choices = [({'index': i, 'message': {'role': 'assistant', 'content': t}} if chat else
                  {'index': i, 'text': t}) | {'logprobs': None, 'finish_reason': r}
                 for i, (t, r) in enumerate(zip(texts, reasons))]
      return JSONResponse({**head, 'object': 'chat.completion' if chat else 'text_completion',
                           'choices': choices, 'usage': usage(tokens)})

    obj = 'chat.completion.chunk' if chat else 'text_completion'

    def chunk(i: int, piece: str | None, reason: str | None = None, role: bool = False) -> str:
      if chat:
        delta = {'role': 'assistant', 'content': ''} if role else ({} if piece is None else {'content': piece})
        c = {'index': i, 'delta': delta, 'logprobs': None, 'finish_reason': reason}
      else:
        c = {'index': i, 'text': piece or '', 'logprobs': None, 'finish_reason': reason}
      return f'data: {json.dumps({**head, "object": obj, "choices": [c]})}\n\n'

    async def sse() -> AsyncIterator[str]:
      tokens = 0
      try:
        if chat:
          for i in range(job.n):
            yield chunk(i, None, role=True)
        async for ev in events:
          if ev[0] == 'text':
            piece = text_of(ev[1], ev[2])
            if piece:
              yield chunk(ev[1], piece)
          else:
            tokens += ev[3]
            yield chunk(ev[1], None, ev[2])
        if req['usage_in_stream']:
          yield f'data: {json.dumps({**head, "object": obj, "choices": [], "usage": usage(tokens)})}\n\n'
        yield 'data: [DONE]\n\n'
      except ApiError as e:
        yield f'data: {json.dumps(e.body())}\n\n'
      finally:
        await events.aclose()  # a client gone mid-stream: its rows are dropped

    return StreamingResponse(sse(), media_type='text/event-stream',
                             headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})

  async def completions(request: Request):
    return await complete(request, 'completions')

  async def chat_completions(request: Request):
    return await complete(request, 'chat')

  async def http_error(request: Request, exc: HTTPException):
    return ApiError(exc.status_code, f'{request.method} {request.url.path}: {exc.detail}').response()

  async def server_error(request: Request, exc: Exception):
    return ApiError(500, f'internal error: {type(exc).__name__}', type_='server_error').response()

  routes = [Route('/v1/completions', completions, methods=['POST']),
            Route('/v1/chat/completions', chat_completions, methods=['POST']),
            Route('/v1/models', models, methods=['GET']), Route('/health', health, methods=['GET']),
            Route('/', page, methods=['GET'])]
  app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
  return BearerAuth(app, api_key) if api_key else app


class BearerAuth:
  """ASGI middleware: every HTTP request needs `Authorization: Bearer <key>` (401 otherwise), but GET / (the
  chat page: static, no model output in it; a browser cannot send the header when it opens a URL)."""

  def __init__(self, app, key: str):
    self.app, self.key = app, key.encode()

  async def __call__(self, scope, receive, send):
    if scope['type'] == 'http' and not (scope['path'] == '/' and scope['method'] in ('GET', 'HEAD')):
      auth = dict(scope.get('headers') or []).get(b'authorization', b'')
      scheme, _, given = auth.partition(b' ')
      if scheme.lower() != b'bearer' or not hmac.compare_digest(given.strip(), self.key):
        err = ApiError(401, 'missing or wrong API key: send the header Authorization: Bearer <key>',
                       code='invalid_api_key')
        await err.response()(scope, receive, send)
        return
    await self.app(scope, receive, send)
