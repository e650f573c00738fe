"""An OpenAI-compatible HTTP server for a trained model, with batched decoding of concurrent requests.

  python -m minillm_jax.serve --workdir=runs/x                      # http://127.0.0.1:8000/v1
  python -m minillm_jax.serve --ckpt=model.pt --port=8080 --api_key=secret

Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming with "stream": true), GET /v1/models,
GET /health. The API is inference.server; how requests share a batch is inference.scheduler. Unset sampling
fields of a request default to the sampling flags, then the run config's `sample` section.
"""
from __future__ import annotations

import ipaddress
import os
import sys

from absl import flags

from minillm_jax import cli
from minillm_jax.config import UserError
from minillm_jax.inference import frontend as fe
from minillm_jax.inference.scheduler import Scheduler


def main(argv):
  f = flags.FLAGS
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}; flags go as --name=value')
  if not 1 <= f.max_batch <= 1024 or f.max_queue < 1 or f.chunk < 1 or f.batch_wait_ms < 0:
    raise UserError('--max_batch must be in [1, 1024], --max_queue and --chunk >= 1, --batch_wait_ms >= 0')
  if not 0 <= f.port < 65536:
    raise UserError(f'--port={f.port} must be in [0, 65535]')
  try:
    import uvicorn

    from minillm_jax.inference.server import Defaults, create_app
  except ImportError:  # starlette and uvicorn
    raise UserError("serving needs the serve extra: pip install -e '.[serve]'") from None
  api_key = f.api_key or os.environ.get('MINILLM_API_KEY') or None
  be = fe.backend_from_flags()
  sp, max_new, seed = fe.sampling_from_flags(be)
  name = f.model_name or os.path.basename(os.path.normpath(f.workdir or f.ckpt or 'model'))
  sched = Scheduler(be, f.max_batch, f.max_queue, f.chunk, f.batch_wait_ms / 1000, seed)
  sched.warmup(f.warmup)
  sched.start()
  app = create_app(be, sched, name, Defaults(sp, max_new, tuple(fe.stop_strings())), api_key)
  try:
    public = not ipaddress.ip_address(f.host).is_loopback
  except ValueError:  # a host name
    public = f.host != 'localhost'
  if public and not api_key:
    print(f'warning: --host={f.host} serves other machines and no --api_key is set: anyone who reaches this '
          'port can use the model', file=sys.stderr, flush=True)
  print(f'# {be.describe()}; serving {name!r} on http://{f.host}:{f.port}/v1 (max batch {f.max_batch} rows)',
        file=sys.stderr, flush=True)
  uvicorn.run(app, host=f.host, port=f.port, log_level=f.log_level, timeout_graceful_shutdown=5)
  sched.stop()


if __name__ == '__main__':
  fe.define_model_flags()
  fe.define_sampling_flags()
  flags.adopt_module_key_flags(fe)  # --workdir, --ckpt, sampling: defined there, shown in serve's --help
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0 serves other machines too).')
  flags.DEFINE_integer('port', 8000, 'Port to listen on.')
  flags.DEFINE_string('api_key', None, 'Require "Authorization: Bearer <key>" on every endpoint (default: the '
                      'MINILLM_API_KEY environment variable; unset = no key).')
  flags.DEFINE_string('model_name', None, 'The model id the API reports (default: the workdir or file name).')
  flags.DEFINE_integer('max_batch', 16, 'Most rows (requests x n) decoded together in one batch.')
  flags.DEFINE_integer('max_queue', 64, 'Most requests waiting for a batch; more get HTTP 429.')
  flags.DEFINE_integer('chunk', 4, 'Decode steps between handing new text to the streams.')
  flags.DEFINE_float('batch_wait_ms', 10, 'How long a new batch waits for more requests to join it.')
  flags.DEFINE_bool('warmup', False, 'Compile every padded batch size (1, 2, 4, ... --max_batch) in every KV '
                    'cache length (64, 128, ... the context) with every prefill chunk (16, 32, 64) before '
                    'serving; otherwise only 1 row in 64, and the first batch of each other shape waits for '
                    'its compile.')
  flags.DEFINE_enum('log_level', 'warning', ['critical', 'error', 'warning', 'info', 'debug'],
                    'uvicorn\'s log level (info logs every request).')
  cli.run(main)
