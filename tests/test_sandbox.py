"""The execution sandbox of the code suite (minillm_jax.evals.sandbox): hostile generated functions are
contained (files outside the temp dir untouched and unread, no commands, no network, no signals to the
evaluator, no survivors, no forged pass), and ordinary functions still pass or fail on their tests."""
import hashlib
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time

import pytest

from minillm_jax.evals import code_eval as ce
from minillm_jax.evals import sandbox as sb

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the sandbox is Linux-only')
SECRET = 'sentinel: keep me\n'


@pytest.fixture
def outside():
  """A directory outside the sandbox holding a sentinel, both world-writable: file permissions do not protect
  them from a child that runs as `nobody`, only the sandbox does."""
  d = pathlib.Path(tempfile.mkdtemp(prefix='sandbox-test-'))
  d.chmod(0o777)
  s = d / 'sentinel'
  s.write_text(SECRET)
  s.chmod(0o666)
  yield d
  shutil.rmtree(d, ignore_errors=True)


def state(d: pathlib.Path) -> dict:
  return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in d.iterdir()}


@pytest.fixture
def no_namespaces(monkeypatch):
  """The fallback where `unshare` is missing or refused: hook and limits only."""
  monkeypatch.setattr(sb, '_UNSHARE', ())
  sb._isolation.cache_clear()
  yield
  sb._isolation.cache_clear()


# each snippet is a complete hostile "function"; {d} is the outside dir, {s} its sentinel
HOSTILE = {
  # files outside the temp dir: written, created, deleted, renamed, read, listed, through links or dir fds
  'overwrite': "open({s!r}, 'w').write('pwned')",
  'append': "open({s!r}, 'a').write('pwned')",
  'create': "open({d!r} + '/new', 'x')",
  'os.open': "import os\nos.open({d!r} + '/new', os.O_WRONLY | os.O_CREAT)",
  'truncate': "import os\nos.truncate({s!r}, 0)",
  'posix.unlink': "import posix\nposix.unlink({s!r})",
  'os.remove': "import os\nos.remove({s!r})",
  'rename': "import os\nos.rename({s!r}, {s!r} + '.moved')",
  'chmod': "import os\nos.chmod({s!r}, 0)",
  'utime': "import os\nos.utime({s!r}, (0, 0))",
  'rmtree': "import shutil\nshutil.rmtree({d!r})",
  'move': "import shutil\nshutil.move({s!r}, 'here')",
  'mkdir': "import os\nos.mkdir({d!r} + '/sub')",
  'mkfifo': "import os\nos.mkfifo({d!r} + '/fifo')",
  'symlink': "import os\nos.symlink({s!r}, 'link')\nopen('link', 'w').write('pwned')",
  'hardlink': "import os\nos.link({s!r}, 'link')",
  'read': "raise SystemExit(open({s!r}).read())",
  'read posix': "import posix\nfd = posix.open({s!r}, posix.O_RDONLY)\nraise SystemExit(posix.read(fd, 100))",
  'list outside': "raise SystemExit(str(__import__('os').listdir({d!r})))",
  'list /root': "raise SystemExit(str(__import__('os').listdir('/root')))",
  'scandir /': "raise SystemExit(str(list(__import__('os').scandir('/'))))",
  'dir fd': "import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.open('sentinel', os.O_WRONLY, dir_fd=fd)",
  'stdlib dir fd': "import os\nos.open(os.path.dirname(os.__file__), os.O_RDONLY)",
  'dotdot': "import os\nos.mkdir('a')\nos.chdir('a')\nopen('../../' + {d!r}.rsplit('/', 1)[1] + '/x', 'w')",
  'chdir /': "import os\nos.chdir('/')\nopen({s!r}[1:], 'w')",
  'fd chmod': "import os\nos.chmod(1, 0o777)",
  # commands and processes
  'posix.system': "import posix\nposix.system('touch {d}/cmd')",
  'os.system': "import os\nos.system('touch {d}/cmd')",
  'posix_spawn': "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'touch {d}/cmd'], {{}})",
  'subprocess': "import subprocess\nsubprocess.run(['touch', '{d}/cmd'])",
  'popen': "import os\nos.popen('touch {d}/cmd').read()",
  'exec': "import os\nos.execv('/bin/sh', ['sh', '-c', 'touch {d}/cmd'])",
  'fork': "import os\nif os.fork() == 0:\n    os.setsid()\n    open({d!r} + '/child', 'w')\n    os._exit(0)",
  'pty': "import pty\npty.spawn(['/bin/sh', '-c', 'touch {d}/cmd'])",
  'fork_exec': "import _imp, importlib.util as u\n_imp.create_dynamic(u.find_spec('_posixsubprocess'))",
  'ctypes': "import ctypes\nctypes.CDLL(None).system(b'touch {d}/cmd')",
  'create_builtin': "import _imp, importlib.machinery as m\n_imp.create_builtin(m.ModuleSpec('posix', None))",
  # signals to the evaluator
  'kill parent': "import os, posix\nposix.kill(os.getppid(), 9)",
  'killpg': "import os\nos.killpg(os.getpgid(0), 9)",
  'pidfd': "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
  # the harness's secrets: command line, environment, stdin, memory, frames
  'cmdline': "raise SystemExit(open('/proc/self/cmdline').read())",
  'environ': "raise SystemExit(open('/proc/self/environ').read())",
  'mem': "open('/proc/self/mem', 'rb')",
  'stdin fd': "raise SystemExit(open('/proc/self/fd/0').read())",
  'getframe': "import sys\nraise SystemExit(str(sys._getframe(1).f_locals))",
  'tb_frame': "try:\n    1 / 0\nexcept Exception as e:\n    raise SystemExit(str(e.__traceback__.tb_frame))",
  'gi_frame': "def g():\n    yield\nraise SystemExit(str(g().gi_frame))",
  'gc': "import gc\nraise SystemExit(str(len(gc.get_objects())))",
  'signal frame': "import signal\nsignal.signal(signal.SIGALRM, lambda n, f: None)",
  'settrace': "import sys\nsys.settrace(lambda *a: None)",
  'rlimit': "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (99, 99))",
  'passwd db': "import pwd\nraise SystemExit(str(pwd.getpwall()))",
}


@pytest.mark.parametrize('name', list(HOSTILE))
def test_hostile_code_is_contained(name, outside):
  s = outside / 'sentinel'
  before = state(outside)
  r = sb.run(HOSTILE[name].format(d=str(outside), s=str(s)), 'pass', timeout=3)
  assert r['status'] == 'fail' and 'sandbox' in r['detail'], r  # refused by the sandbox, not failed otherwise
  assert SECRET.strip() not in r['detail'], r
  assert state(outside) == before and s.read_text() == SECRET  # nothing outside written, created or deleted


def test_the_evaluator_survives_and_pass_cannot_be_forged():
  ok = 'def add(a, b):\n    return a + b\n'
  for body in ('import os; os._exit(0)', 'import sys; sys.exit(0)', 'exit()', 'raise SystemExit(0)',
               'import os, posix; posix.kill(os.getppid(), 9)'):
    r = ce.run_tests(f'def add(a, b):\n    {body}\n', 'assert add(2, 3) == 5', timeout=3)
    assert r['status'] == 'fail', (body, r)
  # what a pass looked like before (a token on stdout), then exit 0 before the tests
  fake = ("import sys, os\nsys.stdout.write('\\n' + '0' * 32 + '\\nPASS\\n')\nsys.stdout.flush()\n"
          "os._exit(0)\n")
  assert ce.run_tests(fake + ok, 'assert add(2, 3) == 5', timeout=3)['status'] == 'fail'
  # junk on every descriptor (the verdict pipe among them) with tests that pass: the record is not exact
  junk = ("import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'0' * 32 + b'\\n')\n"
          "    except OSError:\n        pass\n")
  assert ce.run_tests(junk + ok, 'assert add(2, 3) == 5', timeout=3)['status'] == 'fail'
  # rebinding what the harness uses does not skip the tests
  for patch in ('import builtins\nbuiltins.exec = lambda *a, **k: None\n',
                'import builtins\nbuiltins.BaseException = int\n',
                'import os\nos.write = lambda *a: None\nos._exit = lambda *a: None\n'):
    r = ce.run_tests(patch + ok, 'assert add(2, 3) == 6', timeout=3)
    assert r['status'] == 'fail' and 'AssertionError' in r['detail'], (patch, r)
  assert ce.run_tests(ok, 'assert add(2, 3) == 5', timeout=3)['status'] == 'pass'  # and this process lives on


def test_ordinary_functions_pass_and_fail_and_the_temp_dir_goes():
  r = ce.run_tests('def add(a, b):\n    return a + b\n', 'assert add(2, 3) == 5')
  assert r['status'] == 'pass' and r['namespaces'] == sb.isolation()['namespaces']
  r = ce.run_tests('def add(a, b):\n    return a - b\n', 'assert add(2, 3) == 5')
  assert r['status'] == 'fail' and r['detail'] == 'AssertionError'
  # the standard library works inside: imports, its own temp dir, pathlib, typing/enum/namedtuple, logging
  src = ('import collections, dataclasses, enum, json, logging, math, pathlib, re, tempfile, typing\n'
         'P = collections.namedtuple("P", "x y")\nE = enum.Enum("E", "a b")\nT = typing.TypeVar("T")\n'
         'logging.getLogger("t").info("x")\npathlib.Path("f.txt").write_text("hi")\n'
         'assert open("f.txt").read() == "hi" and tempfile.mkdtemp().startswith(__import__("os").getcwd())\n'
         'def root(x):\n    return math.sqrt(x)\n')
  assert ce.run_tests(src, 'assert root(9) == 3')['status'] == 'pass'
  r = ce.run_tests('import os\nraise SystemExit(os.getcwd())\n', '')
  assert r['status'] == 'fail' and r['detail'].startswith('SystemExit: /')
  assert 'minillm-sandbox-' in r['detail']
  assert not os.path.exists(r['detail'].split(': ', 1)[1])


def test_an_endless_function_times_out():
  t0 = time.time()
  r = sb.run('while True:\n    pass\n', '', timeout=1.0)
  assert r['status'] == 'timeout' and time.time() - t0 < 6, r


def heartbeat(path: pathlib.Path, setsid: bool) -> str:
  """A child (or, with setsid, a grandchild in a session of its own) that appends to `path` every 50 ms, while
  the function spins."""
  inner = '    os.setsid()\n    if os.fork() == 0:\n' if setsid else '    if True:\n'
  return (f'import os, time\nif os.fork() == 0:\n{inner}        while True:\n'
          f'            with open({str(path)!r}, "a") as f:\n                f.write("x")\n'
          f'            time.sleep(0.05)\n    os._exit(0)\nwhile True:\n    pass\n')


def still_beating(path: pathlib.Path) -> bool:
  n = path.stat().st_size if path.exists() else 0
  time.sleep(0.5)
  return (path.stat().st_size if path.exists() else 0) != n


def test_timeout_kills_the_process_group_without_namespaces(no_namespaces, outside):
  """The deadline's killpg on its own (no pid namespace): a child left in the group dies with the run."""
  beat = outside / 'heartbeat'
  r = sb.run(heartbeat(beat, setsid=False), '', timeout=1.5, audit=False)
  assert r['status'] in ('timeout', 'fail') and not r['namespaces'], r
  if sb.isolation()['user'] is None and os.geteuid() == 0:  # no limit on processes here: the child did run
    assert beat.exists()
  assert not still_beating(beat)


def test_no_survivors_even_without_the_hook(outside):
  """With the audit hook off, the kernel layers alone: a setsid grandchild (if a process can be made at all)
  dies with the run: the pid namespace, or RLIMIT_NPROC, stops it."""
  iso = sb.isolation()
  if not (iso['pid_namespace'] or iso['user'] is not None or os.geteuid() != 0):
    pytest.skip('neither a pid namespace nor an enforced RLIMIT_NPROC here')
  beat = outside / 'heartbeat'
  r = sb.run(heartbeat(beat, setsid=True), '', timeout=1.5, audit=False)
  assert r['status'] in ('timeout', 'fail'), r
  if iso['user'] is None and os.geteuid() == 0:  # no limit on processes here: the grandchild did run
    assert beat.exists()
  assert not still_beating(beat)


def test_network_is_refused():
  with socket.socket() as listener:
    listener.bind(('127.0.0.1', 0))
    listener.listen()
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
    r = sb.run(connect, '', timeout=3)
    assert r['status'] == 'fail' and 'sandbox' in r['detail'], r
    if sb.isolation()['namespaces']:  # the network namespace on its own: no route to this listener
      assert sb.run(connect, '', timeout=3, audit=False)['status'] == 'fail'
    with pytest.raises(TimeoutError):
      listener.accept()


def test_nproc_limit_stops_new_processes_and_threads(monkeypatch):
  """RLIMIT_NPROC 0 binds a non-root child (root is exempt in the kernel: as root the sandbox runs it as
  nobody when the interpreter is readable by nobody), checked with the hook off."""
  for python in dict.fromkeys([sys.executable, shutil.which('python3'), '/usr/bin/python3']):
    if python and os.path.exists(python):
      monkeypatch.setattr(sb, 'PYTHON', python)
      if os.geteuid() != 0 or sb.isolation()['user'] is not None:
        break
  else:
    pytest.skip('running as root and no interpreter here that `nobody` can run')
  src = ('import os, threading\ntry:\n    pid = os.fork()\nexcept BlockingIOError:\n    pass\nelse:\n'
         '    if pid == 0:\n        os._exit(0)\n    raise SystemExit("forked")\ntry:\n'
         '    threading.Thread(target=print).start()\nexcept RuntimeError:\n    pass\nelse:\n'
         '    raise SystemExit("thread started")\n')
  r = sb.run(src, '', timeout=3, audit=False)
  assert r['status'] == 'pass', r
  assert sb.run('def add(a, b):\n    return a + b\n', 'assert add(2, 3) == 5')['status'] == 'pass'


def test_without_namespaces_the_hook_still_holds(no_namespaces, outside):
  s = outside / 'sentinel'
  iso = sb.isolation()
  assert not iso['namespaces'] and not iso['pid_namespace']
  r = ce.run_tests('def add(a, b):\n    return a + b\n', 'assert add(2, 3) == 5')
  assert r['status'] == 'pass' and r['namespaces'] is False
  for name in ('overwrite', 'posix.unlink', 'posix.system', 'kill parent', 'fork', 'read', 'cmdline'):
    r = sb.run(HOSTILE[name].format(d=str(outside), s=str(s)), 'pass', timeout=3)
    assert r['status'] == 'fail' and 'sandbox' in r['detail'], (name, r)
  assert s.read_text() == SECRET and sorted(p.name for p in outside.iterdir()) == ['sentinel']
