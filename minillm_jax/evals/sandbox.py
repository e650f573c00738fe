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

from minillm_jax.evals import sandbox_child

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
  body = inspect.getsource(sandbox_child.child) + '\nchild()\n'
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
