"""Shared entry-point plumbing: --config/--workdir flags, one-line errors with exit code 2 instead of tracebacks."""
from __future__ import annotations

import errno
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from minillm_jax import config as config_lib

FLAGS = flags.FLAGS
flags.disclaim_key_flags()  # --config/--workdir defined here belong to the entry point (shown in its --help)
EXIT_USER_ERROR = 2


# errors of the disk rather than of a path the user gave: one line and exit 2 (cli.run), never a traceback
DISK_ERRNOS = {errno.ENOSPC: 'disk full', errno.EDQUOT: 'disk quota exceeded', errno.EROFS: 'read-only filesystem'}


def disk_error(e: BaseException) -> OSError | None:
  """The OSError for a full disk, exhausted quota or read-only filesystem in e or its causes, else None."""
  seen = 0
  while e is not None and seen < 10:
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return e
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def die(msg: str, code: int = EXIT_USER_ERROR):
  print(f'error: {msg}', file=sys.stderr, flush=True)
  sys.exit(code)


def presets_dir() -> str | None:
  """Where the named presets are: minillm_jax/presets in an installed wheel (pyproject.toml maps the repository's
  configs/ there), else the checkout's configs/ (an editable install or a plain checkout)."""
  pkg = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(pkg, 'presets')
  if os.path.isfile(os.path.join(installed, 'tiny.py')):
    return installed
  checkout = os.path.join(os.path.dirname(pkg), 'configs')
  # pyproject.toml beside it: a top-level `configs` package of some other project in site-packages is not ours
  if os.path.isfile(os.path.join(os.path.dirname(pkg), 'pyproject.toml')) and os.path.isdir(checkout):
    return checkout
  return None


def preset_names() -> list[str]:
  d = presets_dir()
  return sorted(f[:-3] for f in os.listdir(d) if f.endswith('.py') and not f.startswith('_')) if d else []


def resolve_config(spec: str) -> str:
  """--config's value with a preset name made a path: `tiny`, `tiny.py`, `tiny:mini` and, when no such file is
  here, `configs/tiny.py[:mini]` (the README's commands, run outside the checkout) name the installed presets.
  An existing file always wins. Exits 2 with one line for a name that is no preset."""
  path, sep, variant = spec.partition(':')
  if not path or os.path.exists(path):  # a directory too: the file checks say it is one
    return spec
  head, base = os.path.split(path)
  name = base.removesuffix('.py')
  if head not in ('', 'configs') or (head and not base.endswith('.py')):
    return spec  # a path elsewhere: the file checks say what is wrong with it
  if name in preset_names():
    return os.path.join(presets_dir(), name + '.py') + sep + variant
  if head or base.endswith('.py'):
    return spec  # a file name that is no preset either: reported as a missing file, with the presets named
  names = ', '.join(preset_names()) or 'none found (reinstall minillm-jax)'
  die(f'unknown preset {path!r}; presets: {names} (a variant as name:variant, e.g. tiny:mini), or pass a '
      'config file\'s path')


def define_config(default: str | None = 'configs/shakespeare_char.py'):
  if default and not os.path.isfile(default):  # run outside the checkout: the installed preset of that name
    default = resolve_config(default)
  config_flags.DEFINE_config_file(
      'config', default, 'Config: a preset name (tiny, shakespeare_char; name:variant, e.g. tiny:mini) or a '
      'file (configs/*.py, file.py:variant); override fields with --config.section.field=value, e.g. '
      '--config.optim.lr=3e-4.', lock_config=True)


def define_workdir(required: bool = True, default: str | None = None):
  flags.DEFINE_string('workdir', default, 'Run directory: checkpoints, metrics, tokenizer, samples '
                      '(layout in WORKSPACE.md).', required=required and default is None)


def config():
  """The parsed --config, validated; exits 2 with one line when it is missing or wrong."""
  if FLAGS['config'].value is None and not FLAGS['config'].present:
    die('no config given: pass --config=<preset> (e.g. --config=tiny; presets: ' + ', '.join(preset_names())
        + ') or --config=FILE.py')
  path = FLAGS['config'].config_filename.split(':')[0]
  _check_config_file(path)
  try:
    cfg = FLAGS.config
    cfg.keys()  # a broken file is an _ErrorConfig that raises on first access
  except Exception as e:  # noqa: BLE001 - any failure to load the file is the user's to fix
    die(f'cannot load config {path!r}: {_one_line(e)}')
  try:
    return config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    die(f'config: {e}')


def model_config_or_exit(cfg, vocab_size: int | None = None):
  try:
    return config_lib.model_config(cfg, vocab_size)
  except config_lib.ConfigError as e:
    die(f'config: {e}')


def _resolve_config_args(argv: list[str]) -> list[str]:
  """argv with --config=NAME (or --config NAME) turned into the preset's path."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a == '--config' and i + 1 < len(argv) and i > 0:
      a, i = f'--config={argv[i + 1]}', i + 1
    if a.startswith('--config=') and i > 0:
      a = '--config=' + resolve_config(a[len('--config='):])
    out.append(a)
    i += 1
  return out


def _parse(argv):
  argv = _resolve_config_args(argv)
  path = _config_path(argv)
  if path:  # before config_flags loads it for an override and fails deep inside
    _check_config_file(path)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):  # config_flags wraps the file's own exception and traceback
      last = [ln for ln in str(e).splitlines() if ln.strip()][-1]
      path = _config_path(argv)
      lines = re.findall(r'File "([^"]+)", line (\d+)', str(e))
      at = [n for f, n in lines if path and os.path.abspath(f) == os.path.abspath(path)]
      where = f'{path}:{at[-1]}' if at else path
      m = re.search(r"Could not override field '(\w+)' \(reference\)\. (.*) is of original type <class '(\w+)'> "
                    r"and cannot be casted to type <class '(\w+)'>", last)
      if m:  # ml_collections' own words for a value of the wrong type: name the field, both types and the line
        die(f'cannot load config {where}: field {m[1]!r} must be {m[4]}, not {m[3]} ({m[2]!r}); fix that line')
      die(f'cannot load config {path}: ' + re.sub(r'^[\w.]+\.(\w+):', r'\1:', last.strip()))
    hint = ''
    if "flag 'config." in str(e):
      hint = ' (config overrides need --config=FILE; a run\'s own config is <workdir>/config.py)'
    elif 'Unknown command line flag' in str(e):
      hint = ' (run with --helpfull to see all flags)'
    die(f'{e}{hint}')
  except Exception as e:  # noqa: BLE001 - config_flags raises AttributeError/KeyError/TypeError for bad overrides
    path = _config_path(argv)
    where = _line_in(e, path) if path else None
    if where is not None:  # the config file itself failed (syntax error, get_config raised)
      die(f'cannot load config {path}{where}: {_one_line(e)}')
    if isinstance(e, AttributeError) and 'get_config' in str(e):
      die(f'cannot load config {path}: it defines no get_config() (see configs/*.py)')
    if _one_line(e) == 'AttributeError: workdir':
      die('bad config override: the run directory is not a config field; pass it as --workdir=DIR')
    secs = [a[len('--config.'):].split('.')[0] for a in argv if a.startswith('--config.')]
    sec = next((s for s in secs if s not in _sections()), None)  # not the first override: the unknown one
    if isinstance(e, KeyError) and sec is not None:
      die(f'bad config override: no config section {sec!r} (sections: {", ".join(_sections())})')
    die(f'bad config override: {_one_line(e)}')


def _check_config_file(path: str):
  if not os.path.isfile(path):
    die(f'config file {path!r} {"is a directory" if os.path.isdir(path) else "not found"}; pass a preset name '
        f'({", ".join(preset_names())}), a config file or a run\'s <workdir>/config.py')


def _config_path(argv) -> str | None:
  """The file of --config=file.py[:variant], as given."""
  return next((a.split('=', 1)[1].split(':')[0] for a in argv if a.startswith('--config=')), None)


def _line_in(e: BaseException, path: str) -> str | None:
  """':LINE' when the exception was raised from the file at `path` (or is a SyntaxError in it), else None."""
  import traceback
  target = os.path.abspath(path)
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == target:
    return f':{e.lineno}'
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == target]
  return f':{lines[-1]}' if lines else None


def _sections() -> list[str]:
  return list(config_lib.default_config().keys())


def _one_line(e: BaseException) -> str:
  text = str(e.args[0]) if e.args and isinstance(e.args[0], str) else str(e)
  text = text.replace('\\n', '; ').replace("\\'", '').strip('\'"').replace("'", '')  # config_flags nests reprs
  return f'{type(e).__name__}: ' + ' '.join(text.split()) if text.strip() else type(e).__name__


def cache_dir() -> str:
  """The user cache: compiled XLA programs, the fused attention library, measured matmul peaks."""
  return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
                      'minillm_jax')


def use_compilation_cache():
  """Reuses compiled XLA programs across runs: the second run of a config skips compiling its train step
  (BENCHMARKS.md tables, "compile s"). JAX_COMPILATION_CACHE_DIR overrides the place; set it empty to turn it
  off."""
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:  # jax reads it itself
    return
  import jax
  path = os.path.join(cache_dir(), 'xla')
  try:  # a read-only home: run without the cache rather than warn on every compile
    os.makedirs(path, exist_ok=True)
  except OSError:
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_compilation_cache_max_size', 2 ** 30)  # least recently used entries go first


def run(main):
  """absl app.run with our parser; UserError anywhere in main becomes one line and exit 2."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  use_compilation_cache()

  def wrapped(argv):
    if not FLAGS['verbosity'].present:  # absl/jax/orbax INFO chatter (backend probing, every save) hides our output
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except config_lib.UserError as e:
      die(str(e))
    except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
      # a path the user gave that cannot be created, read or written (a full disk or read-only filesystem: below;
      # other OSErrors keep their traceback: they are not bad input)
      paths = ' -> '.join(repr(p) for p in (e.filename, e.filename2) if p is not None)
      die(f'{e.strerror or type(e).__name__}: {paths}' if paths else f'{type(e).__name__}: {e}')
    except KeyboardInterrupt:
      die('interrupted', 130)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(141)
    except Exception as e:
      # a full disk, an exhausted quota or a read-only filesystem: the user's to fix, not a bug (the training loop
      # closes the run first and says so itself)
      err = disk_error(e)
      if err is None:
        raise
      fix = ('free space and run the same command again' if err.errno != errno.EROFS else
             'make it writable or write somewhere else (--workdir, --out)')
      die(f'{DISK_ERRNOS[err.errno]} while writing {err.filename or "a file"}; {fix}')

  app.run(wrapped, flags_parser=_parse)
