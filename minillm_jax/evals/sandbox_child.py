"""The program the sandbox's interpreter runs (minillm_jax.evals.sandbox ships this function's source with
`python -I -B -c`, so it may use the standard library only and nothing else of this module): it reads the job
from stdin, sets the limits, installs the audit hook, runs the function and its tests, and writes the verdict
record. The layers and what they promise are in sandbox's docstring."""


def child() -> None:
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
