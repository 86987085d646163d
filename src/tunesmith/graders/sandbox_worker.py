"""The process a python grader runs in: sandbox.py starts it as ``python -I -S -B -c <this file's text>``.

Standard library only, and nothing of tunesmith: it runs in an empty temporary directory with a cleared
environment. Protocol, one JSON object per line: the parent sends a header ({"source", "paths", "memory_mb",
"cpu_s"}); this process answers {"ready": true} or {"fatal": reason}; then for each {"sample", "item"} it
answers {"score": x} or {"error": reason}. Before the grader's code runs, in this order: resource limits,
stdin/stdout/stderr moved to /dev/null (the protocol keeps private copies), an audit hook (PEP 578) that
refuses file access outside the Python installation, writing any file, sockets, new processes, signals to
other processes, raising limits, ctypes, and tampering with the hook itself.
"""

import json
import numbers
import os
import resource
import signal
import sys


def main():
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    header = json.loads(proto_in.readline())
    send = _sender(proto_out)
    try:
        limit_resources(header["memory_mb"], header["cpu_s"])
        sys.path[:0] = [p for p in header["paths"] if p not in sys.path]
        refusals = []
        silence_std_streams()
        sys.addaudithook(make_hook(allowed_prefixes(), refusals))
        grade = load_grader(header["source"])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails every sample with it
        send({"fatal": f"{type(e).__name__}: {e}"})
        return
    send({"ready": True})
    loads = json.loads
    for line in iter(proto_in.readline, b""):
        request = loads(line)
        del refusals[:]
        send(grade_one(grade, request["sample"], request["item"], refusals))


def _sender(stream):
    dumps, write = json.dumps, stream.write  # bound now: the grader's code may replace json.dumps

    def send(message):
        write(dumps(message).encode("utf-8") + b"\n")

    return send


def limit_resources(memory_mb, cpu_s):
    limits = {
        resource.RLIMIT_AS: memory_mb * 2**20,  # address space: a big allocation raises MemoryError
        resource.RLIMIT_CPU: cpu_s,  # a backstop; the parent enforces the per-sample wall-clock limit
        resource.RLIMIT_FSIZE: 0,  # no file may grow (writing raises OSError, as SIGXFSZ is ignored)
        resource.RLIMIT_NPROC: 0,  # no fork or thread (not binding for root, where the audit hook is)
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: 64,
    }
    for kind, value in limits.items():
        hard = resource.getrlimit(kind)[1]
        cap = (lambda v: v) if hard == resource.RLIM_INFINITY else (lambda v: min(v, hard))
        resource.setrlimit(kind, (cap(value), cap(value + 5 if kind == resource.RLIMIT_CPU else value)))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _die_with_parent_and_drop_network()


def _die_with_parent_and_drop_network():
    """Best effort, Linux: SIGKILL when the parent dies; as root, an empty network namespace (no interfaces,
    so no network even for native code). ctypes is then removed, and the audit hook refuses it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.geteuid() == 0:
            libc.unshare(0x40000000)  # CLONE_NEWNET
    except Exception:  # noqa: BLE001 - not Linux, or no libc: the audit hook still refuses sockets
        pass
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def silence_std_streams():
    """The grader's prints go nowhere: stdout is the parent's protocol pipe, and must carry only answers."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stdin = sys.stdout = sys.stderr = open(os.devnull, "r+")


def allowed_prefixes():
    """The Python installation's own folders: the standard library and the site-packages on sys.path."""
    return tuple(p.rstrip("/") + "/" for p in sys.path if p.startswith("/") and len(p.rstrip("/")) > 1)


BLOCKED_EVENTS = frozenset({
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
    "resource.prlimit", "os.chdir", "os.chmod", "os.chown", "os.chflags", "os.lchflags", "os.link", "os.symlink",
    "os.mkdir", "os.rmdir", "os.remove", "os.rename", "os.truncate", "os.utime", "os.setxattr", "os.removexattr",
    "os.listxattr", "os.getxattr", "tempfile.mkstemp", "tempfile.mkdtemp", "glob.glob", "glob.glob/2",
    "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "nntplib.connect",
    "poplib.connect", "imaplib.open", "telnetlib.Telnet.open", "webbrowser.open", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents", "sys._current_frames",
})
BLOCKED_PREFIXES = ("socket.", "ctypes.", "shutil.", "winreg.", "_winapi.", "msvcrt.")
BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_hook(prefixes, refusals):
    """The audit hook. Everything it uses is bound as a default argument now, so the grader's code cannot
    change its behaviour by replacing a module attribute or a builtin; replacing the hook's own __code__ or
    __defaults__ is refused (the hook is not reachable from the grader's code in the first place)."""
    me = []

    def hook(event, args, _blocked=BLOCKED_EVENTS, _blocked_prefixes=BLOCKED_PREFIXES, _modules=BLOCKED_MODULES,
             _prefixes=prefixes, _write=WRITE_FLAGS, _log=refusals, _type=type, _str=str, _int=int,
             _bytes=bytes, _repr=repr, _inside=_inside, _error=PermissionError, _not_found=ModuleNotFoundError, _me=me):
        if event in _blocked or event.startswith(_blocked_prefixes):
            reason = event
        elif event == "import":
            name = args[0]
            if _type(name) is _str and name.partition(".")[0] in _modules:
                # an ImportError, not logged as a refusal: libraries import ctypes optionally (numpy does)
                raise _not_found(f"sandbox: import {name} is not allowed", name=name)
            reason = None
        elif event == "object.__setattr__":
            reason = f"changing the audit hook's {args[1]}" if args[0] is _me[0] else None
        elif event == "open" or event == "os.listdir" or event == "os.scandir":
            path = args[0]
            mode = args[1] if event == "open" else None
            flags = args[2] if event == "open" else 0
            # repr() of the grader's own object would run its code inside the hook: only of plain values
            shown = _repr(path) if _type(path) in (_str, _bytes, _int) else f"a {_type(path).__name__} path"
            if _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode) or \
                    _type(flags) is _int and flags & _write:
                reason = f"writing {shown}"
            elif _type(path) is not _str or not _inside(path, _prefixes):
                reason = f"{'opening' if event == 'open' else 'listing'} {shown}"
            else:
                reason = None
        else:
            reason = None
        if reason is not None:
            message = f"sandbox: {reason} is not allowed (a python grader may not touch files, the network or " \
                      "other processes)"
            _log.append(message)
            raise _error(message)

    me.append(hook)
    return hook


def _inside(path, prefixes):
    """An absolute path, lexically normalised (no symlinks followed: the grader cannot create any), under
    one of the prefixes."""
    if not path.startswith("/"):
        return False
    parts = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    normal = "/" + "/".join(parts)
    return (normal + "/").startswith(prefixes)


def load_grader(source):
    namespace = {"__name__": "grader", "__builtins__": __builtins__}
    exec(compile(source, "<grader>", "exec"), namespace)
    grade = namespace.get("grade")
    if not callable(grade):
        raise TypeError("the source defines no function grade(sample, item)")
    return grade


def grade_one(grade, sample, item, refusals):
    try:
        value = grade(sample, item)
    except MemoryError:
        return {"error": "MemoryError: the grader reached the sandbox's memory limit"}
    except BaseException as e:  # noqa: BLE001 - the grader's failure is this sample's 0, with the reason
        if refusals:
            return {"error": refusals[0]}
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    if refusals:  # refused, and the grader caught it: still a 0, as the attempt is the finding
        return {"error": refusals[0]}
    if type(value) is bool or not isinstance(value, numbers.Real):
        return {"error": f"grade() returned {repr(value)[:80]} ({type(value).__name__}), not a number"}
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        return {"error": f"grade() returned {value}, not a finite number"}
    return {"score": value}


main()
