"""The execution sandbox of the code suite: `run(source, tests, timeout)` executes a generated function and
its unit tests in a fresh, locked-down Python interpreter and reports pass / fail / timeout. It stops
accidental and casually hostile damage; it is not a security boundary like a VM or a container (see the end).

The layers, outermost first:

- Linux namespaces, where unprivileged user namespaces work (probed once per interpreter, cached):
  `unshare --user --map-root-user --net --pid --fork --kill-child` (util-linux), or without the pid namespace
  if only that part fails. The child has no network (an empty network namespace) and cannot see or signal the
  evaluating process (a pid namespace, whose processes all die with its first one, setsid or not). Without
  them it runs as is and the report says `'namespaces': False`.
- As root, when the interpreter is readable by `nobody`, the child runs as uid/gid 65534 without groups: the
  kernel then refuses it files it does not own, and enforces RLIMIT_NPROC, which root is exempt from.
- Limits set before any untrusted code: RLIMIT_NPROC 0 (no new process or thread), RLIMIT_AS 1 GiB,
  RLIMIT_FSIZE 1 MiB (stdout/stderr are unnamed files under it), RLIMIT_CPU ceil(timeout) + 1 s,
  RLIMIT_CORE 0, RLIMIT_NOFILE 256; its own session, whose process group is killed (SIGKILL) at the deadline
  and after every run; a fresh temporary directory as cwd, HOME and TMPDIR, removed afterwards.
- An audit hook (`sys.addaudithook`) installed before the function runs. Audit events are raised in C, so
  `import posix` and the other back doors reach the same checks. It refuses:
  - process creation: os.system, os.exec*, os.fork/forkpty, os.posix_spawn, subprocess and pty, and importing
    _posixsubprocess (whose fork_exec raises no event);
  - signals to other processes: os.kill of any pid but its own, os.killpg;
  - the network: every `socket.*` event and the client libraries' events;
  - native code: ctypes and cffi (imports and `ctypes.*` events), extension modules from outside the
    interpreter's own library directories, subinterpreters, code.__new__;
  - writes outside its temp dir: `open` with a write/append/create/truncate mode or flag, os.remove, rename,
    rmdir, mkdir, chmod, chown, utime, truncate, xattrs (by path or by fd), shutil and tempfile events;
    /dev/null is the one exception;
  - reads and listings outside its temp dir and the interpreter's library directories (the sys.path entries:
    stdlib, lib-dynload, site-packages; plus /dev/null, /dev/zero, /dev/urandom), so /proc/self/* (cmdline,
    environ, mem, fd) and /root are out; paths are checked as written and with symlinks resolved; symlinks and
    hard links cannot be made, directories outside the temp dir cannot be opened (no dir_fd escapes), and a
    relative path may not hold `..`; the account databases (pwd, grp, spwd) cannot be imported;
  - raising its limits (resource.setrlimit/prlimit), and the ways to the harness's frames: sys._getframe,
    sys._current_frames, sys.settrace/setprofile, gc.get_objects/get_referrers/get_referents and the
    tb_frame, gi_frame, cr_frame, ag_frame attributes.
  Functions that raise no event are replaced by ones that refuse: os.mkfifo, mknod, pidfd_open, chroot, setns,
  unshare, setpriority, sched_set*; signal.signal (its handlers receive frames) and signal.pidfd_send_signal;
  _imp.create_builtin (which would make a fresh copy of those modules; the built-in modules allowed are
  imported first). A refusal raises PermissionError (also a ValueError, so stdlib code that probes
  sys._getframe, as typing, enum and logging do, carries on).

The verdict cannot be forged by printing or exiting: the parent sends a random nonce over stdin with the
function and tests; the harness reads stdin to EOF and closes it, keeps the nonce only in a local variable of
its own frame, compiles the tests and installs the hook before the function runs, runs the function then the
tests with `exec`, `os.write` and `os._exit` bound beforehand (rebinding builtins changes nothing), and only
when the tests return writes the nonce to a pipe whose write end it was given (no name, nothing on the command
line, in the environment or in a file) and exits 0. A pass needs exit status 0 AND exactly that record:
exiting early (os._exit(0), sys.exit), printing a fake result, writing to the pipe or killing itself fail.

What it does not promise. Generated code runs in the same interpreter as the harness: interpreter
memory-safety bugs (known crashers, crafted bytecode through marshal) defeat it, and object-graph tricks past
the refused entry points above are out of scope. Another thread can race the hook's path checks (time of
check, time of use). os.stat and friends raise no event, so it can learn which paths exist. It can burn its
CPU and memory limits and fill its temp dir (RLIMIT_FSIZE is per file). A function that fakes results
(`__eq__` always True, rebound builtins the tests call) passes its asserts: the sandbox contains damage, it
does not judge semantics. Unless the child runs as `nobody`, a way around the hook has the evaluating user's
file rights (the user namespace maps that user to its root; it takes no file rights away), and as root
without the `nobody` drop RLIMIT_NPROC does not bind (the hook and the pid namespace then stop new processes
and survivors); without namespaces, the network and other processes are kept out by the hook alone.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

PYTHON = sys.executable  # the sandboxed interpreter (stdlib only is needed; tests point it elsewhere)
MEMORY = 1 << 30
FILE_SIZE = 1 << 20
NOBODY = 65534
_UNSHARE = (('--user', '--map-root-user', '--net', '--pid', '--fork', '--kill-child'),
            ('--user', '--map-root-user', '--net'))


def run(source: str, tests: str, timeout: float = 3.0, *, audit: bool = True) -> dict:
  """Runs `source` then `tests` in the sandbox (see the module docstring); killed with everything it started
  after `timeout` seconds. Returns {'status': 'pass' | 'fail' | 'timeout', 'detail': str (the last line of
  its stderr, e.g. the assertion), 'namespaces': bool}. `audit=False` (tests only) leaves the hook out, to
  check what the kernel-level layers hold on their own."""
  iso = isolation()
  nonce = secrets.token_hex(16)
  tmp = os.path.realpath(tempfile.mkdtemp(prefix='minillm-sandbox-'))
  r = w = -1
  try:
    if iso['user'] is not None:
      os.chown(tmp, iso['user'], iso['user'])
    r, w = os.pipe()
    limits = {'RLIMIT_NPROC': 0, 'RLIMIT_AS': MEMORY, 'RLIMIT_FSIZE': FILE_SIZE,
              'RLIMIT_CPU': math.ceil(timeout) + 1, 'RLIMIT_CORE': 0, 'RLIMIT_NOFILE': 256}
    payload = json.dumps({'nonce': nonce, 'fd': w, 'tmp': tmp, 'source': source, 'tests': tests,
                          'audit': audit, 'limits': limits}).encode()
    # output goes to unnamed files under the file-size limit, not to pipes read into this process's memory
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      try:
        p = subprocess.Popen(_command(iso), stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=tmp,
                             env=_env(tmp), start_new_session=True, pass_fds=(w,), **_user(iso))
      finally:
        os.close(w)
      timed_out = False
      try:
        p.communicate(payload, timeout=timeout)
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        _kill_group(p.pid)  # the whole session, always: whatever it left running
        rc = p.wait()
        if p.stdin:
          try:
            p.stdin.close()
          except OSError:
            pass
      record = _drain(r)
      err.seek(max(0, err.seek(0, 2) - 4096))
      stderr = err.read().decode('utf-8', 'replace')
  finally:
    if r >= 0:
      os.close(r)
    _rmtree(tmp)
  report = {'namespaces': iso['namespaces']}
  if rc == 0 and record == f'{nonce}\n'.encode():
    return {'status': 'pass', 'detail': '', **report}
  if timed_out:
    return {'status': 'timeout', 'detail': f'killed after {timeout}s', **report}
  why = (f'exit code {rc}' if rc else 'verdict record tampered with' if record
         else 'exited before its tests finished')
  last = (stderr.strip().splitlines() or [why])[-1]
  return {'status': 'fail', 'detail': last[:200], **report}


def isolation(python: str | None = None) -> dict:
  """How the sandbox runs children of `python` here (probed once, cached): {'namespaces': bool,
  'pid_namespace': bool, 'user': uid the child runs as, or None for this process's own}."""
  return dict(_isolation(python or PYTHON))


@functools.cache
def _isolation(python: str) -> dict:
  unshare = shutil.which('unshare')
  prefixes = [([unshare, *args, '--'], True, '--pid' in args) for args in _UNSHARE] if unshare else []
  prefixes.append(([], False, False))
  users = [NOBODY, None] if os.geteuid() == 0 else [None]
  for user in users:
    for prefix, ns, pid in prefixes:
      iso = {'python': python, 'prefix': prefix, 'namespaces': ns, 'pid_namespace': pid, 'user': user}
      if _probe(iso):
        return iso
  return {'python': python, 'prefix': [], 'namespaces': False, 'pid_namespace': False, 'user': None}


def _probe(iso: dict) -> bool:
  tmp = tempfile.mkdtemp(prefix='minillm-sandbox-probe-')
  try:
    if iso['user'] is not None:
      os.chown(tmp, iso['user'], iso['user'])
    cmd = [*iso['prefix'], iso['python'], '-I', '-B', '-c', 'import json, os, resource; os.listdir(".")']
    return subprocess.run(cmd, check=False, cwd=tmp, env=_env(tmp), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                          start_new_session=True, **_user(iso)).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False
  finally:
    _rmtree(tmp)


def _command(iso: dict) -> list[str]:
  body = inspect.getsource(_child) + '\n_child()\n'
  return [*iso['prefix'], iso['python'], '-I', '-B', '-c', body]


def _env(tmp: str) -> dict:
  return {'PATH': os.defpath, 'HOME': tmp, 'TMPDIR': tmp, 'LANG': 'C.UTF-8'}


def _user(iso: dict) -> dict:
  u = iso['user']
  return {} if u is None else {'user': u, 'group': u, 'extra_groups': []}


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _drain(fd: int) -> bytes:
  """What the child wrote on the verdict pipe (at most 4 KiB; never blocks, should anything still hold it)."""
  os.set_blocking(fd, False)
  data = b''
  while len(data) <= 4096:
    try:
      chunk = os.read(fd, 4096)
    except BlockingIOError:
      break
    if not chunk:
      break
    data += chunk
  return data


def _rmtree(path: str) -> None:
  """Removes the temp dir whatever modes the child left on it."""
  try:
    os.chmod(path, 0o700)
  except OSError:
    pass
  for root, dirs, _ in os.walk(path):
    for d in dirs:
      try:
        os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
      except OSError:
        pass
  shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ the child

def _child() -> None:
  """The sandboxed interpreter's only program, shipped as its source with `python -I -B -c` (so it uses the
  standard library only). Everything it uses once untrusted code runs is bound here, as locals or closure
  cells: that code can rebind builtins and module attributes, not these (their frames are refused)."""
  import builtins
  import json
  import os
  import resource
  import stat
  import sys

  run, exit_now, write, show = exec, os._exit, os.write, sys.__excepthook__
  base_exception, type_of = BaseException, type
  streams = (sys.stdout, sys.stderr)
  chunks = []
  while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
      break
    chunks.append(chunk)
  os.close(0)
  os.open(os.devnull, os.O_RDONLY)  # fd 0 again, empty: the nonce is gone from stdin
  cfg = json.loads(b''.join(chunks))
  del chunks, chunk
  record = cfg.pop('nonce').encode() + b'\n'
  fd, tmp = cfg['fd'], cfg['tmp']
  for name, value in cfg['limits'].items():
    key = getattr(resource, name)
    hard = resource.getrlimit(key)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(key, (value, value))
  source = compile(cfg['source'], '<function>', 'exec')
  tests = compile(cfg['tests'], '<tests>', 'exec')

  def guard() -> None:
    import _imp
    import _signal
    import posix

    class Refused(PermissionError, ValueError):
      """A refusal of the sandbox (a ValueError too: stdlib code probing sys._getframe carries on)."""

    Refused.__name__ = Refused.__qualname__ = 'PermissionError'  # how tracebacks and reports name it
    Refused.__module__ = 'builtins'

    deny_imports = {'ctypes', '_ctypes', 'cffi', '_cffi_backend', '_posixsubprocess', '_xxsubinterpreters',
                    '_xxinterpchannels', '_interpreters', '_interpqueues', '_interpchannels', '_testcapi',
                    '_testinternalcapi', '_testmultiphase', '_testsinglephase', '_testimportmultiple',
                    '_testbuffer', '_testclinic', '_ctypes_test', '_xxtestfuzz', '_tkinter', 'readline',
                    '_sqlite3', '_dbm', '_gdbm', '_ssl', '_posixshmem', '_multiprocessing', '_curses',
                    '_curses_panel', 'pwd', 'grp', 'spwd', 'syslog', 'xxsubtype'}
    for m in sys.builtin_module_names:  # create_builtin goes below: what may be imported, import now
      if m not in sys.modules and m not in deny_imports:
        __import__(m)
    deny = {'os.system', 'os.exec', 'os.fork', 'os.forkpty', 'os.posix_spawn', 'os.spawn', 'os.startfile',
            'pty.spawn', 'webbrowser.open', 'os.killpg', 'os.symlink', 'os.link', 'sys.settrace',
            'sys.setprofile', 'sys._current_frames', 'sys._current_exceptions', 'sys._getframe',
            'sys.addaudithook', 'sys.remote_exec', 'sys.monitoring.register_callback', 'gc.get_objects',
            'gc.get_referrers', 'gc.get_referents', 'code.__new__', 'resource.setrlimit', 'resource.prlimit',
            'cpython.PyInterpreterState_New', 'ensurepip.bootstrap', 'pdb.Pdb'}
    deny_prefixes = ('socket.', 'ctypes.', 'subprocess.', 'syslog.', 'sqlite3.', 'dbm.', 'ftplib.', 'http.',
                     'imaplib.', 'nntplib.', 'poplib.', 'smtplib.', 'telnetlib.', 'urllib.', 'winreg.',
                     '_winapi.', 'msvcrt.')
    frame_attrs = {'tb_frame', 'gi_frame', 'cr_frame', 'ag_frame', 'f_back'}
    reads = {'os.listdir': (0,), 'os.scandir': (0,), 'os.chdir': (0,), 'os.getxattr': (0,),
             'os.listxattr': (0,), 'os.walk': (0,), 'os.fwalk': (0,), 'shutil.copyfile': (0,),
             'shutil.copymode': (0,), 'shutil.copystat': (0,), 'shutil.copytree': (0,),
             'shutil.unpack_archive': (0,), 'shutil.make_archive': (2,)}
    writes = {'os.remove': (0,), 'os.rmdir': (0,), 'os.mkdir': (0,), 'os.rename': (0, 1), 'os.chmod': (0,),
              'os.chown': (0,), 'os.truncate': (0,), 'os.utime': (0,), 'os.setxattr': (0,),
              'os.removexattr': (0,), 'shutil.rmtree': (0,), 'shutil.move': (0, 1), 'shutil.copyfile': (1,),
              'shutil.copymode': (1,), 'shutil.copystat': (1,), 'shutil.copytree': (1,), 'shutil.chown': (0,),
              'shutil.unpack_archive': (1,), 'shutil.make_archive': (0,), 'tempfile.mkstemp': (0,),
              'tempfile.mkdtemp': (0,)}
    passthrough = {'os.putenv', 'os.unsetenv', 'os.lockf', 'glob.glob', 'glob.glob/2', 'pathlib.Path.glob',
                   'pathlib.Path.rglob'}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    devices = {'/dev/null', '/dev/zero', '/dev/urandom', '/dev/random'}
    read_roots = tuple(sorted({os.path.realpath(p) for p in sys.path
                               if os.path.isabs(p) and os.path.exists(p)} - {'/'})) + (tmp,)
    me = os.getpid()
    fspath, lstat, stat_of, readlink, getcwd = os.fspath, os.lstat, os.stat, os.readlink, os.getcwd
    is_link, is_dir = stat.S_ISLNK, stat.S_ISDIR
    is_a, to_str, to_bytes, to_int, show_value, int_repr = isinstance, str, bytes, int, repr, int.__repr__
    encoding = sys.getfilesystemencoding()

    def text(p):
      """The path string an OS call used (None: a file descriptor). The os-level events (open, os.*) get the
      path already converted from any path object, exactly what the call uses; only the Python-level shutil
      events pass objects on, and what they do underneath is checked again at the os level."""
      if p is None:
        return '.'
      if is_a(p, to_int):
        return None
      if type_of(p) is not to_str and type_of(p) is not to_bytes:
        p = fspath(p)
      if type_of(p) is to_bytes:
        p = p.decode(encoding, 'surrogateescape')
      if type_of(p) is not to_str:
        raise Refused('sandbox: not a path')
      return p

    def absolute(s):
      parts = s.split('/')
      if not s.startswith('/'):
        if '..' in parts:
          raise Refused('sandbox: ".." in a relative path is refused')
        parts = getcwd().split('/') + parts
      out = []
      for c in parts:
        if c == '..':
          if out:
            out.pop()
        elif c and c != '.':
          out.append(c)
      return '/' + '/'.join(out)

    def resolve(path):
      todo, done, hops = [c for c in path.split('/') if c][::-1], '', 0
      while todo:
        c = todo.pop()
        if c == '.':
          continue
        if c == '..':
          done = done[:done.rfind('/')]
          continue
        nxt = done + '/' + c
        try:
          mode = lstat(nxt).st_mode
        except OSError:  # missing: the rest as written
          done = nxt
          continue
        if is_link(mode):
          hops += 1
          if hops > 40:
            raise Refused('sandbox: too many symlinks')
          target = readlink(nxt)
          if target.startswith('/'):
            done = ''
          todo.extend([x for x in target.split('/') if x][::-1])
        else:
          done = nxt
      return done or '/'

    def inside(p, roots):
      for root in roots:
        if p == root or p.startswith(root + '/'):
          return True
      return False

    def allowed(p, writing, opening=False):
      s = text(p)
      if s is None:
        if not writing:
          return True
        # an fd-based change (fchmod, ftruncate...): where the fd points (int's own repr: an int subclass
        # cannot format itself as another number)
        s = readlink('/proc/self/fd/' + int_repr(p))
      a = absolute(s)
      r = resolve(a)
      if a in devices and r in devices:
        return not writing or a == '/dev/null'
      if writing:
        return inside(a, (tmp,)) and inside(r, (tmp,))
      if not (inside(a, read_roots) and inside(r, read_roots)):
        return False
      if opening and not inside(r, (tmp,)):  # no directory fds outside the temp dir (dir_fd escapes)
        try:
          return not is_dir(stat_of(r).st_mode)
        except OSError:
          return True
      return True

    def check(event, args):
      if event in deny or event.startswith(deny_prefixes):
        return False
      if event == 'open':
        path, mode, flags = args
        if is_a(path, to_int):  # an fd it already holds: the kernel checked it when it was opened
          return True
        writing = (is_a(flags, to_int) and flags & write_flags) or (
            is_a(mode, to_str) and ('w' in mode or 'a' in mode or 'x' in mode or '+' in mode))
        return allowed(path, bool(writing), opening=True)
      if event == 'import':
        name, origin = args[0], args[1]
        if name in deny_imports or name.split('.')[0] in deny_imports:
          return False
        # extension modules (their origin is a file) only from the interpreter's own library directories
        return not is_a(origin, to_str) or (inside(absolute(origin), read_roots[:-1])
                                             and inside(resolve(absolute(origin)), read_roots[:-1]))
      if event == 'object.__getattr__':
        return args[1] not in frame_attrs
      if event == 'os.kill':
        return args[0] == me
      ok = True
      if event in reads:
        ok = all_ok(args, reads[event], False)
      if ok and event in writes:
        ok = all_ok(args, writes[event], True)
      if event in reads or event in writes or event in passthrough:
        return ok
      return not event.startswith(('os.', 'shutil.', 'tempfile.', 'signal.'))  # unknown ones there: no

    def all_ok(args, positions, writing):
      for i in positions:
        if i < len(args) and not allowed(args[i], writing):
          return False
      return True

    def hook(event, args):
      try:
        ok = check(event, args)
      except base_exception:
        ok = False
      if not ok:
        what = args[0] if args and type_of(args[0]) in (to_str, to_bytes, to_int) else None
        raise Refused(f'sandbox: {event} refused' if what is None else
                      f'sandbox: {event} {show_value(what)[:120]} refused')

    def removed(name):
      def refuse(*args, **kwargs):
        raise Refused(f'sandbox: {name} refused (it raises no audit event)')
      return refuse

    # functions that raise no audit event: gone (and _imp.create_builtin with them, so no fresh copy of their
    # module can be made); a denied module something already imported leaves sys.modules
    os_names = ('mkfifo', 'mknod', 'pidfd_open', 'chroot', 'setns', 'unshare', 'setpriority',
                'sched_setaffinity', 'sched_setparam', 'sched_setscheduler')
    signal_names = ('signal', 'pidfd_send_signal')
    for module, names in ((os, os_names), (posix, os_names), (_signal, signal_names),
                          (sys.modules.get('signal'), signal_names), (_imp, ('create_builtin',)),
                          (sys.modules.get('_posixsubprocess'), ('fork_exec',))):
      for n in names:
        if module is not None and hasattr(module, n):
          setattr(module, n, removed(f'{module.__name__}.{n}'))
    for m in deny_imports:
      sys.modules.pop(m, None)
    sys.addaudithook(hook)

  if cfg['audit']:
    guard()
  del guard

  def flush():
    for s in streams:
      try:
        s.flush()
      except base_exception:
        pass

  namespace = {'__name__': '__main__', '__builtins__': builtins}
  del cfg
  try:
    run(source, namespace)
    run(tests, namespace)
  except base_exception as e:
    try:
      show(type_of(e), e, e.__traceback__)
    except base_exception:
      pass
    flush()
    exit_now(1)
  flush()
  write(fd, record)
  exit_now(0)
