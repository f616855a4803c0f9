# The escape probes of crates/shuttle/tests/escape.rs, run as root inside a VM (and, to prove
# that each can fail, on the host: SHUTTLE_ESCAPE_ON_HOST, see escape.rs).
#
#   python3 -c PROBES CASE TARGET CONTEXT_JSON
#
# prints exactly one verdict line:
#
#   VERDICT OPEN <what got through>     the channel is open
#   VERDICT CLOSED <what stopped it>    the channel is closed
#
# Anything else (an exception, no verdict) is a broken probe, and the test fails.
#
# Every probe must be harmless on the host, where the channels are open: it asks the kernel
# whether an operation is permitted in a way that changes nothing (an invalid argument the
# kernel checks only after the permission, opening a file for writing without writing, writing
# back the value just read, a namespace in a child process that exits), and it only tries the
# real, changing operation when that first check says closed and it runs in a VM (HOST_MODE
# false), where a change would stay inside the VM.
import ctypes
import errno
import fcntl
import glob
import json
import mmap
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

CASE, TARGET, ctx = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
HOST_MODE = ctx["mode"] == "host"
NONCE = ctx["nonce"]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# x86_64 system call numbers.
NR = dict(
    ioctl=16, kill=62, ptrace=101, syslog=103, pivot_root=155, adjtimex=159, chroot=161,
    settimeofday=164, mount=165, umount2=166, sethostname=170, setdomainname=171,
    init_module=175, delete_module=176, tgkill=234, clock_settime=227, add_key=248,
    keyctl=250, kexec_load=246, unshare=272, perf_event_open=298, name_to_handle_at=303,
    open_by_handle_at=304, clock_adjtime=305, setns=308, process_vm_readv=310,
    finit_module=313, kexec_file_load=320, bpf=321, userfaultfd=323, pidfd_send_signal=424,
    io_uring_setup=425, io_uring_enter=426, pidfd_getfd=438, fanotify_init=300, acct=163, reboot=169,
    swapon=167, swapoff=168, quotactl=179, iopl=172, ioperm=173, io_uring_register=427, open_tree=428,
    move_mount=429, fsopen=430, fspick=433, pidfd_open=434, clone=56, clone3=435,
)
AT_FDCWD = -100
EPERM = errno.EPERM


class Open(Exception):
    pass


def OPEN(detail):
    raise Open(detail)


def en(e):
    return errno.errorcode.get(e, str(e))


def arg(a):
    if isinstance(a, bool):
        return ctypes.c_long(int(a))
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if a is None:
        return ctypes.c_void_p(None)
    return a


def sc(name, *args):
    """A raw system call: (result, errno)."""
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(NR[name]), *[arg(a) for a in args])
    return r, (ctypes.get_errno() if r < 0 else 0)


def in_child(fn, timeout=20):
    """Runs fn() in a forked child; returns what it returned (JSON-able), or
    ("killed", signal) when a signal ended it (a seccomp kill, for instance)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = json.dumps(["ok", fn()])
        except Open as e:
            out = json.dumps(["open", str(e)])
        except BaseException as e:  # noqa: B902 - report anything to the parent
            out = json.dumps(["error", repr(e)])
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    data = b""
    deadline = time.time() + timeout
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    if os.WIFSIGNALED(status) and not data:
        return ["killed", os.WTERMSIG(status)]
    kind, value = json.loads(data)
    if kind == "open":
        OPEN(value)
    if kind == "error":
        raise RuntimeError("probe child failed: " + value)
    return value


def fx(target):
    return ctx[target]


def fixture_tag(t):
    return "escape-fixture-%s-%s" % (t["where"], NONCE)


def who_is(pid, t):
    """'fixture' when /proc/PID is the target fixture, 'other' when it is some other process
    of ours, None when no such process is visible."""
    try:
        cmd = open("/proc/%d/cmdline" % pid, "rb").read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return "fixture" if fixture_tag(t).encode() in cmd else "other"


def target_pids(t):
    """The fixture's pid as the host sees it and as its own VM sees it, each only when it is
    not one of our own processes (signalling those proves nothing and could hurt us)."""
    out, notes = [], []
    for pid in dict.fromkeys([t["pid"], t.get("nspid", t["pid"])]):
        w = who_is(pid, t)
        if w == "other":
            notes.append("pid %d is a process of our own" % pid)
        else:
            out.append((pid, w))
    return out, notes


def fixture_reply(data):
    """(where, channel) of a fixture's reply, or None."""
    parts = data.decode(errors="replace").split()
    if len(parts) >= 4 and parts[0] == "FIXTURE" and parts[3] == NONCE:
        return parts[1], parts[2]
    return None


def open_for_write(paths):
    notes = []
    for p in paths:
        for path in sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                notes.append("%s: %s" % (path, en(e.errno)))
                continue
            os.close(fd)
            OPEN("%s opens for writing" % path)
    return "; ".join(notes) or "no such file is visible"


def real_attempts():
    """Whether to try the real, changing operation (only inside a VM)."""
    return not HOST_MODE


PROBES = {}


def probe(name):
    def register(fn):
        PROBES[name] = fn
        return fn

    return register


# ---------------------------------------------------------------- processes


@probe("signal")
def p_signal(target):
    t = fx(target)
    pids, notes = target_pids(t)
    for pid, w in pids:
        r, e = sc("kill", pid, signal.SIGUSR1)
        if r == 0:
            OPEN("kill(%d, SIGUSR1) was delivered (%s)" % (pid, w))
        notes.append("kill(%d): %s" % (pid, en(e)))
        r, e = sc("tgkill", pid, pid, signal.SIGUSR1)
        if r == 0:
            OPEN("tgkill(%d) was delivered" % pid)
        fd, e = sc("pidfd_open", pid, 0)
        if fd >= 0:
            r, e = sc("pidfd_send_signal", fd, signal.SIGUSR1, None, 0)
            os.close(fd)
            if r == 0:
                OPEN("pidfd_send_signal(%d) was delivered" % pid)
        notes.append("pidfd (%d): %s" % (pid, en(e)))
    return "; ".join(notes)


@probe("sigio")
def p_sigio(target):
    t = fx(target)
    pids, notes = target_pids(t)
    for pid, w in pids:
        r, wr = os.pipe()
        try:
            fcntl.fcntl(r, fcntl.F_SETOWN, pid)
        except OSError as e:
            notes.append("F_SETOWN %d: %s" % (pid, en(e.errno)))
            continue
        F_SETSIG = 10
        fcntl.fcntl(r, F_SETSIG, signal.SIGUSR1)
        fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
        os.write(wr, b"x")
        time.sleep(0.1)
        OPEN("F_SETOWN(%d) accepted (%s): its signal is armed on our pipe" % (pid, w))
    return "; ".join(notes)


@probe("ptrace")
def p_ptrace(target):
    t = fx(target)
    pids, notes = target_pids(t)

    def seize():
        out = []
        for pid, w in pids:
            # PTRACE_SEIZE does not stop the tracee; the tracer's exit detaches it.
            r, e = sc("ptrace", 0x4206, pid, 0, 0)
            if r == 0:
                OPEN("PTRACE_SEIZE of %d (%s) succeeded" % (pid, w))
            out.append("PTRACE_SEIZE %d: %s" % (pid, en(e)))
        return out

    return "; ".join(notes + in_child(seize))


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@probe("process-memory")
def p_process_memory(target):
    t = fx(target)
    expected = ("SECRET-%s-%s" % (t["where"], NONCE)).encode()
    pids, notes = target_pids(t)
    for pid, w in pids:
        buf = ctypes.create_string_buffer(len(expected))
        local = Iovec(ctypes.addressof(buf), len(expected))
        remote = Iovec(t["secret_addr"], len(expected))
        r, e = sc("process_vm_readv", pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if r > 0 and buf.raw == expected:
            OPEN("process_vm_readv(%d) read the target's secret" % pid)
        notes.append("process_vm_readv %d: %s" % (pid, en(e) if r < 0 else "other data"))
        try:
            with open("/proc/%d/mem" % pid, "rb") as f:
                f.seek(t["secret_addr"])
                if f.read(len(expected)) == expected:
                    OPEN("/proc/%d/mem gave the target's secret" % pid)
        except OSError as e:
            notes.append("/proc/%d/mem: %s" % (pid, en(e.errno)))
    return "; ".join(notes)


@probe("proc")
def p_proc(target):
    t = fx(target)
    tag = fixture_tag(t).encode()
    n = 0
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        n += 1
        try:
            if tag in open("/proc/%s/cmdline" % p, "rb").read():
                OPEN("/proc/%s is the target process" % p)
        except OSError:
            pass
    pids, notes = target_pids(t)
    for pid, w in pids:
        if w == "fixture":
            OPEN("/proc/%d is visible" % pid)
        notes.append("/proc/%d absent" % pid)
    return "%d processes visible, none is the target; %s" % (n, "; ".join(notes))


@probe("broker-signal")
def p_broker_signal(target):
    cli = "/run/shuttle/shuttle"
    if not os.path.exists(cli):
        return "no VM API here (%s absent)" % cli
    out = subprocess.run([cli, "signal", ctx["victim_vm"], "python3", "-s", "USR1"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode == 0 or " sent to " in out.stderr:
        OPEN("shuttle signal: %s" % out.stderr.strip())
    return "shuttle signal refused (exit %d): %s" % (out.returncode, out.stderr.strip())


@probe("vm-init")
def p_vm_init(target):
    # The VM's own init holds the channel to its monitor: a process that could trace it or
    # take its descriptors could forge the monitor's messages.
    pid = ctx["init_pid"]
    notes = []

    def seize():
        r, e = sc("ptrace", 0x4206, pid, 0, 0)
        if r == 0:
            OPEN("PTRACE_SEIZE of init (%d) succeeded" % pid)
        return "PTRACE_SEIZE: %s" % en(e)

    notes.append(in_child(seize))
    pidfd, e = sc("pidfd_open", pid, 0)
    if pidfd < 0:
        notes.append("pidfd_open(%d): %s" % (pid, en(e)))
    else:
        for fd in range(0, 16):
            r, e = sc("pidfd_getfd", pidfd, fd, 0)
            if r >= 0:
                os.close(r)
                OPEN("pidfd_getfd took init's descriptor %d" % fd)
        notes.append("pidfd_getfd: %s" % en(e))
        os.close(pidfd)
    try:
        with open("/proc/%d/mem" % pid, "rb") as f:
            f.read(1)
        OPEN("/proc/%d/mem of init is readable" % pid)
    except OSError as e:
        notes.append("/proc/%d/mem: %s" % (pid, en(e.errno)))
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError as e:
        names = []
        notes.append("/proc/%d/fd: %s" % (pid, en(e.errno)))
    # Listing the numbers is allowed to the owner; following them needs ptrace access.
    for n in names:
        link = "/proc/%d/fd/%s" % (pid, n)
        try:
            OPEN("init's descriptor %s resolves: %s" % (n, os.readlink(link)))
        except OSError as e:
            err = en(e.errno)
        try:
            os.close(os.open(link, os.O_RDONLY | os.O_NONBLOCK))
            OPEN("init's descriptor %s reopens" % n)
        except OSError as e:
            notes.append("fd %s: readlink %s, open %s" % (n, err, en(e.errno)))
    return "; ".join(notes)


@probe("broker-control")
def p_broker_control(target):
    cli = "/run/shuttle/shuttle"
    if HOST_MODE or not os.path.exists(cli):
        # On the host these commands work by design, and would stop the victim.
        return "the VM API is not here (host mode or %s absent)" % cli
    victim = ctx["victim_vm"]
    with open("/tmp/escape-policy.toml", "w") as f:
        f.write('[[rule]]\nop = "connect"\nfrom = "@any"\nto = "%s"\nobject = "unix:/run/esc/D.sock"\n'
                'action = "allow"\n' % victim)
    notes = []
    for args in (["vm", "stop", "-t", "1", victim], ["vm", "rm", "--force", victim],
                 ["policy", "load", "/tmp/escape-policy.toml"], ["answer", "1", "allow"],
                 ["run", victim, "--", "true"], ["vm", "create", "escape-probe"],
                 ["vm", "start", victim]):
        out = subprocess.run([cli] + args, capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            OPEN("`shuttle %s` succeeded inside the VM: %s" % (" ".join(args), out.stderr.strip()))
        notes.append("%s: exit %d" % (args[0] + " " + args[1], out.returncode))
    return "; ".join(notes)


# ---------------------------------------------------------------- sockets


def connect(family, addr, kind=socket.SOCK_STREAM, timeout=2.0):
    s = socket.socket(family, kind)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except OSError as e:
        s.close()
        return None, en(e.errno) if e.errno else str(e)
    try:
        data = s.recv(200)
    except OSError:
        data = b""
    s.close()
    return data, None


def unix_paths(target, *names):
    t = fx(target)
    paths = [os.path.join(t["dir"], n) for n in names]
    pids, _ = target_pids(t)
    # Through the target's processes' roots, if any were visible.
    paths += ["/proc/%d/root%s" % (pid, p) for pid, _ in pids for p in paths[: len(names)]]
    return paths


@probe("unix-stream")
def p_unix_stream(target):
    notes = []
    for path in unix_paths(target, "D.sock", "x"):
        data, err = connect(socket.AF_UNIX, path)
        if err is None:
            OPEN("connected to %s: %r" % (path, data))
        notes.append("%s: %s" % (path, err))
    return "; ".join(notes)


@probe("unix-dgram")
def p_unix_dgram(target):
    notes = []
    for path in unix_paths(target, "dgram.sock"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto(b"escape-probe", path)
            OPEN("datagram sent to %s" % path)
        except OSError as e:
            notes.append("%s: %s" % (path, en(e.errno)))
    return "; ".join(notes)


@probe("abstract")
def p_abstract(target):
    name = fx(target)["abstract"]
    data, err = connect(socket.AF_UNIX, "\0" + name)
    if err is None:
        OPEN("connected to @%s: %r" % (name, data))
    return "@%s: %s" % (name, err)


def inet_addresses(target):
    return ["127.0.0.1"] + fx(target).get("ips", [])


@probe("tcp")
def p_tcp(target):
    t, notes = fx(target), []
    for a in dict.fromkeys(inet_addresses(target)):
        data, err = connect(socket.AF_INET, (a, t["tcp_port"]), timeout=1.0)
        if err is None:
            OPEN("connected to %s:%d: %r" % (a, t["tcp_port"], data))
        notes.append("%s:%d %s" % (a, t["tcp_port"], err))
        # TCP Fast Open connects inside sendto, without the (intercepted) connect call.
        s = socket.socket()
        # Blocking (so sendto waits for the handshake), but never for long.
        one_second = struct.pack("=qq", 1, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, one_second)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, one_second)
        try:
            s.sendto(b"escape-probe", socket.MSG_FASTOPEN, (a, t["tcp_port"]))
            data = s.recv(200)
            OPEN("sendto(MSG_FASTOPEN) reached %s:%d: %r" % (a, t["tcp_port"], data))
        except OSError as e:
            notes.append("fast open: %s" % (en(e.errno) if e.errno else str(e)))
        finally:
            s.close()
    return "; ".join(notes)


@probe("udp")
def p_udp(target):
    t, notes = fx(target), []
    for a in dict.fromkeys(inet_addresses(target)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        try:
            s.connect((a, t["udp_port"]))
            s.send(b"escape-probe")
            data = s.recv(200)
            OPEN("answer from %s:%d: %r" % (a, t["udp_port"], data))
        except OSError as e:
            notes.append("%s:%d %s" % (a, t["udp_port"], en(e.errno) if e.errno else "no answer"))
    return "; ".join(notes)


@probe("host-unix-sockets")
def p_host_unix_sockets(target):
    # Every unix socket the host listens on, as its path resolves here.
    notes = {}
    for path in ctx["host_unix_sockets"]:
        for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
            s = socket.socket(socket.AF_UNIX, kind)
            s.settimeout(1)
            try:
                s.connect(path)
                OPEN("connected to the host's %s" % path)
            except OSError as e:
                if e.errno == errno.EPROTOTYPE:
                    OPEN("the host's %s is reachable (another socket type)" % path)
                if kind == socket.SOCK_STREAM:
                    notes[en(e.errno) if e.errno else str(e)] = notes.get(en(e.errno), 0) + 1
            finally:
                s.close()
    return "%d host sockets tried: %s" % (len(ctx["host_unix_sockets"]), notes)


@probe("socket-tables")
def p_socket_tables(target):
    found = []
    unix = open("/proc/net/unix").read()
    for where in ("host", "vm"):
        t = fx(where)
        if os.path.join(t["dir"], "D.sock") in unix or t["abstract"] in unix:
            found.append("%s unix sockets in /proc/net/unix" % where)
        for table in ("tcp", "tcp6", "udp", "udp6"):
            try:
                rows = open("/proc/net/" + table).read().splitlines()[1:]
            except OSError:
                continue
            ports = {"%04X" % t["tcp_port"], "%04X" % t["udp_port"]}
            for row in rows:
                local = row.split()[1]
                # The VM's own sockets may use the same port by chance; the fixture's listen
                # (0A) or unconnected UDP (07) sockets on its addresses are what we look for.
                if local.split(":")[1] in ports and row.split()[3] in ("0A", "07"):
                    found.append("%s port %s in /proc/net/%s" % (where, local, table))
    if found:
        OPEN("; ".join(found))
    return "neither the host's nor the other VM's sockets are listed"


@probe("shuttle-sockets")
def p_shuttle_sockets(target):
    notes = []
    for path in ctx["shuttle_sockets"]:
        for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.connect(path)
                OPEN("connected to %s" % path)
            except OSError as e:
                if e.errno == errno.EPROTOTYPE:
                    OPEN("%s exists and is reachable (wrong socket type)" % path)
                if kind == socket.SOCK_STREAM:
                    notes.append("%s: %s" % (path, en(e.errno)))
            finally:
                s.close()
    return "; ".join(notes)


# ---------------------------------------------------------------- netlink


def netlink(protocol, msg_type, payload, flags=0x1 | 0x4):
    """Sends one request; returns ("error", errno) for the first error or acknowledgement
    (errno 0), or ("reply", type, payload) for the first answer of another type."""
    return netlink_all(protocol, msg_type, payload, flags)[0]


def netlink_all(protocol, msg_type, payload, flags=0x1 | 0x4):
    """Every message that comes back within a moment (the audit subsystem sends its answer
    after the acknowledgement, from another thread)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    s.settimeout(2)
    s.send(struct.pack("=LHHLL", 16 + len(payload), msg_type, flags, 1, 0) + payload)
    out = []
    while True:
        try:
            r = s.recv(65536)
        except socket.timeout:
            break
        length, typ, _, _, _ = struct.unpack("=LHHLL", r[:16])
        if typ == 2:  # NLMSG_ERROR
            e = -struct.unpack("=i", r[16:20])[0]
            out.append(("error", e))
            if e != 0:
                break
        else:
            out.append(("reply", typ, r[16:length]))
        s.settimeout(0.3)
    s.close()
    return out or [("error", errno.ETIMEDOUT)]


@probe("netlink-route")
def p_netlink_route(target):
    notes = []
    # RTM_NEWADDR with prefix length 33 and RTM_SETLINK of an interface that does not exist:
    # the kernel checks CAP_NET_ADMIN first, then refuses the argument; nothing changes.
    newaddr = struct.pack("=BBBBI", socket.AF_INET, 33, 0, 0, 1)
    newaddr += struct.pack("=HH4s", 8, 2, socket.inet_aton("192.0.2.77"))
    setlink = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0x7FFFFFF0, 0, 0)
    for what, typ, payload in (("RTM_NEWADDR", 20, newaddr), ("RTM_SETLINK", 19, setlink)):
        res = netlink(0, typ, payload)
        if res[0] == "error" and res[1] == EPERM:
            notes.append("%s: EPERM" % what)
        else:
            OPEN("%s is permitted (the kernel answered %s)" % (what, en(res[1]) if res[0] == "error" else res))
    return "; ".join(notes)


@probe("netlink-links")
def p_netlink_links(target):
    names = {n for _, n in socket.if_nameindex()}
    names |= set(os.listdir("/sys/class/net"))
    host = set(fx("host").get("ifaces", [])) - {"lo"}
    if names & host:
        OPEN("host interfaces visible: %s" % sorted(names & host))
    return "interfaces here: %s; the host's: %s" % (sorted(names), sorted(host))


@probe("audit-control")
def p_audit_control(target):
    try:
        res = netlink_all(9, 1000, b"")  # AUDIT_GET
    except OSError as e:
        return "audit socket: %s" % en(e.errno)
    if any(m[0] == "reply" or m[1] == 0 for m in res):
        OPEN("AUDIT_GET answered: the host's audit status is readable")
    return "AUDIT_GET: %s" % en(res[0][1])


@probe("audit-user")
def p_audit_user(target):
    try:
        answers = netlink_all(9, 1000, b"")  # AUDIT_GET
    except OSError as e:
        return "audit socket: %s" % en(e.errno)
    status = [m for m in answers if m[0] == "reply" and m[1] == 1000]
    if status and struct.unpack("=II", status[0][2][:8])[1] != 0:
        # Privileged and auditing on: do not write into the host's audit log.
        OPEN("AUDIT_GET answered and auditing is on: AUDIT_USER would be logged (not sent)")
    res = netlink(9, 1005, b"shuttle escape probe, ignore\0")  # AUDIT_USER
    if res[0] == "error" and res[1] == 0:
        OPEN("the kernel accepted an AUDIT_USER record (it reaches the host's audit log "
             "whenever auditing is on)")
    return "AUDIT_USER: %s" % (en(res[1]) if res[0] == "error" else res)


# ---------------------------------------------------------------- IPC

IPC_STAT, SHM_RDONLY = 2, 0o10000
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


def sysv_listed(kind, key):
    rows = open("/proc/sysvipc/" + kind).read().splitlines()[1:]
    return any(r.split()[0] == str(key) for r in rows)


@probe("sysv-shm")
def p_sysv_shm(target):
    key = fx(target)["shm_key"]
    if sysv_listed("shm", key):
        OPEN("key %d listed in /proc/sysvipc/shm" % key)
    ctypes.set_errno(0)
    i = libc.shmget(key, 0, 0)
    if i >= 0:
        addr = libc.shmat(i, None, SHM_RDONLY)
        data = ctypes.string_at(addr, len(NONCE)) if addr and addr != 2**64 - 1 else b"?"
        OPEN("shmget(%d) found the segment: %r" % (key, data))
    return "shmget(%d): %s" % (key, en(ctypes.get_errno()))


@probe("sysv-sem")
def p_sysv_sem(target):
    key = fx(target)["sem_key"]
    if sysv_listed("sem", key):
        OPEN("key %d listed in /proc/sysvipc/sem" % key)
    ctypes.set_errno(0)
    if libc.semget(key, 0, 0) >= 0:
        OPEN("semget(%d) found the set" % key)
    return "semget(%d): %s" % (key, en(ctypes.get_errno()))


@probe("sysv-msg")
def p_sysv_msg(target):
    key = fx(target)["msg_key"]
    if sysv_listed("msg", key):
        OPEN("key %d listed in /proc/sysvipc/msg" % key)
    ctypes.set_errno(0)
    # Found is enough: receiving would take the message away.
    if libc.msgget(key, 0, 0) >= 0:
        OPEN("msgget(%d) found the queue" % key)
    return "msgget(%d): %s" % (key, en(ctypes.get_errno()))


class MqAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long),
                ("msgsize", ctypes.c_long), ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]


rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.restype = ctypes.c_int
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]


@probe("mq")
def p_mq(target):
    name = fx(target)["mq"]
    try:
        if name.lstrip("/") in os.listdir("/dev/mqueue"):
            OPEN("%s listed in /dev/mqueue" % name)
    except FileNotFoundError:
        pass
    ctypes.set_errno(0)
    q = rt.mq_open(name.encode(), os.O_RDONLY)
    if q >= 0:
        a = MqAttr()
        rt.mq_getattr(q, ctypes.byref(a))
        OPEN("mq_open(%s) opened it (%d messages)" % (name, a.curmsgs))
    return "mq_open(%s): %s" % (name, en(ctypes.get_errno()))


@probe("dev-shm")
def p_dev_shm(target):
    path = fx(target)["shm_file"]
    if os.path.basename(path) in os.listdir(os.path.dirname(path)):
        OPEN("%s is listed" % path)
    try:
        OPEN("%s opened: %r" % (path, open(path).read()))
    except OSError as e:
        return "%s: %s" % (path, en(e.errno))


@probe("fifo")
def p_fifo(target):
    t, notes = fx(target), []
    for path in [os.path.join(t["dir"], "fifo")] + t.get("fifos", []):
        try:
            # Opening for writing without blocking succeeds only when someone reads it.
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            notes.append("%s: %s" % (path, en(e.errno)))
            continue
        os.write(fd, b"escape-probe")
        os.close(fd)
        OPEN("%s has a reader: wrote to it" % path)
    return "; ".join(notes)


# ---------------------------------------------------------------- kernel keyrings

KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_READ, KEYCTL_SEARCH = 1, 11, 10
KEY_SPEC_SESSION_KEYRING = -3


@probe("keyring-join")
def p_keyring_join(target):
    name = fx(target)["keyring"]

    def join():
        ring, e = sc("keyctl", KEYCTL_JOIN_SESSION_KEYRING, name.encode())
        if ring < 0:
            return "keyctl(JOIN_SESSION_KEYRING, %s): %s" % (name, en(e))
        key, e = sc("keyctl", KEYCTL_SEARCH, ring, b"user", b"escape-key", 0)
        if key < 0:
            return "joined a keyring named %s of our own (search: %s)" % (name, en(e))
        buf = ctypes.create_string_buffer(256)
        n, _ = sc("keyctl", KEYCTL_READ, key, buf, 256)
        OPEN("joined the host's keyring %s and read its key: %r" % (name, buf.raw[:max(n, 0)]))

    return in_child(join)


@probe("keyring-add")
def p_keyring_add(target):
    def add():
        # A fresh anonymous session keyring of this child alone: nothing outlives it.
        ring, e = sc("keyctl", KEYCTL_JOIN_SESSION_KEYRING, None)
        if ring < 0:
            return "keyctl(JOIN_SESSION_KEYRING, NULL): %s" % en(e)
        key, e = sc("add_key", b"user", b"escape-probe", b"x", 1, KEY_SPEC_SESSION_KEYRING)
        if key > 0:
            OPEN("add_key succeeded: keys of uid 0 are shared with the host (quota)")
        return "add_key: %s" % en(e)

    return in_child(add)


@probe("proc-keys")
def p_proc_keys(target):
    name = fx(target)["keyring"]
    text = ""
    for f in ("/proc/keys", "/proc/key-users"):
        try:
            text += open(f).read()
        except OSError:
            pass
    if name in text:
        OPEN("/proc/keys lists the host's keyring %s" % name)
    return "/proc/keys: %d bytes, no host keyring" % len(text)


# ---------------------------------------------------------------- mounts and namespaces

MS_REMOUNT, MS_BIND, MNT_DETACH = 32, 4096, 2


@probe("mount")
def p_mount(target):
    d = tempfile.mkdtemp(prefix="escape-")
    try:
        # A bind remount of a plain directory: EINVAL once CAP_SYS_ADMIN is checked.
        r, e = sc("mount", None, d.encode(), None, MS_REMOUNT | MS_BIND, None)
        if e != EPERM:
            OPEN("mount(MS_REMOUNT|MS_BIND) got %s, not EPERM: mounting is permitted" % en(e))
        notes = ["remount: EPERM"]
        if real_attempts():
            for src, fstype, flags, data in ((b"tmpfs", b"tmpfs", 0, None), (b"/", None, MS_BIND, None),
                                             (b"proc", b"proc", 0, None)):
                r, e = sc("mount", src, d.encode(), fstype, flags, data)
                if r == 0:
                    OPEN("mount(%s) succeeded" % src)
                notes.append("mount %s: %s" % (src.decode(), en(e)))
            r, e = sc("mount", None, b"/sys", None, MS_REMOUNT, None)
            if r == 0:
                OPEN("remounted /sys read-write")
            notes.append("remount /sys rw: %s" % en(e))
        return "; ".join(notes)
    finally:
        os.rmdir(d)


@probe("new-mount-api")
def p_new_mount_api(target):
    notes = []
    for what, call in (("fsopen(tmpfs)", ("fsopen", b"tmpfs", 1)),
                       ("open_tree(/, CLONE)", ("open_tree", AT_FDCWD, b"/", 1 | 0o2000000)),
                       ("fspick(/)", ("fspick", AT_FDCWD, b"/", 1))):
        fd, e = sc(*call)
        if fd >= 0:
            os.close(fd)
            OPEN("%s returned a descriptor" % what)
        notes.append("%s: %s" % (what, en(e)))
    r, e = sc("move_mount", -1, b"", -1, b"", 0)
    if e != EPERM:
        OPEN("move_mount got %s, not EPERM" % en(e))
    notes.append("move_mount: EPERM")
    return "; ".join(notes)


@probe("umount")
def p_umount(target):
    d = tempfile.mkdtemp(prefix="escape-")
    try:
        r, e = sc("umount2", d.encode(), 0)
        if e != EPERM:
            OPEN("umount2 of a plain directory got %s, not EPERM: unmounting is permitted" % en(e))
    finally:
        os.rmdir(d)
    notes = ["umount2: EPERM"]
    if real_attempts():
        # The masks and hiding mounts of the VM: unmounting one would uncover what it hides.
        for line in open("/proc/self/mountinfo"):
            point = line.split()[4]
            if point in ("/proc/keys", "/proc/timer_list", "/run/shuttle", "/sys/firmware") \
                    or point.startswith(("/var/", "/home")):
                r, e = sc("umount2", point.encode(), MNT_DETACH)
                if r == 0:
                    OPEN("unmounted %s" % point)
                notes.append("umount %s: %s" % (point, en(e)))
    return "; ".join(notes)


CLONE_NS = dict(user=0x10000000, mnt=0x20000, net=0x40000000, ipc=0x8000000, uts=0x4000000,
                pid=0x20000000, cgroup=0x2000000, time=0x80)


@probe("unshare")
def p_unshare(target):
    notes = []
    for name, flag in CLONE_NS.items():
        res = in_child(lambda: sc("unshare", flag))
        if res[0] == "killed":
            notes.append("%s: killed by signal %d" % (name, res[1]))
        elif res[0] == 0:
            OPEN("unshare(CLONE_NEW%s) succeeded" % name.upper())
        else:
            notes.append("%s: %s" % (name, en(res[1])))
    return "; ".join(notes)


@probe("clone-namespaces")
def p_clone_namespaces(target):
    def attempt():
        out = []
        for name in ("user", "mnt", "net", "pid"):
            flags = CLONE_NS[name] | signal.SIGCHLD
            pid, e = sc("clone", flags, 0, 0, 0, 0)
            if pid == 0:
                os._exit(0)
            if pid > 0:
                os.waitpid(pid, 0)
                OPEN("clone(CLONE_NEW%s) made a child" % name.upper())
            out.append("clone %s: %s" % (name, en(e)))
            # struct clone_args (CLONE_ARGS_SIZE_VER0, 64 bytes): flags, pidfd, child_tid,
            # parent_tid, exit_signal, stack, stack_size, tls.
            args = ctypes.create_string_buffer(struct.pack("=QQQQQQQQ", CLONE_NS[name], 0, 0, 0,
                                                           signal.SIGCHLD, 0, 0, 0))
            pid, e = sc("clone3", args, 64)
            if pid == 0:
                os._exit(0)
            if pid > 0:
                os.waitpid(pid, 0)
                OPEN("clone3(CLONE_NEW%s) made a child" % name.upper())
            out.append("clone3 %s: %s" % (name, en(e)))
        return out

    return "; ".join(in_child(attempt))


@probe("compat-syscalls")
def p_compat_syscalls(target):
    notes = []
    # x32 numbering: unshare is 272 | __X32_SYSCALL_BIT.
    res = in_child(lambda: [libc.syscall(ctypes.c_long(0x40000000 | 272), ctypes.c_long(0x4000000)),
                            ctypes.get_errno()])
    if res[0] == 0:
        OPEN("x32 unshare(CLONE_NEWUTS) succeeded")
    notes.append("x32 unshare: %s" % (("killed by signal %d" % res[1]) if res[0] == "killed" else en(res[1])))

    def i386():
        # push rbx; mov eax, 310 (i386 unshare); mov ebx, edi; int 0x80; pop rbx; ret
        code = bytes([0x53, 0xB8, 0x36, 0x01, 0, 0, 0x89, 0xFB, 0xCD, 0x80, 0x5B, 0xC3])
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        return ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(addr)(0x4000000)

    res = in_child(i386)
    if res == 0:
        OPEN("i386 unshare(CLONE_NEWUTS) through int 0x80 succeeded")
    if isinstance(res, list):
        notes.append("i386 int 0x80: killed by signal %d" % res[1])
    else:
        notes.append("i386 int 0x80: %s" % en(-res))
    return "; ".join(notes)


@probe("setns")
def p_setns(target):
    theirs = {v: k for k, v in fx(target)["ns"].items()}
    found = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            entries = os.listdir("/proc/%s/ns" % p)
        except OSError:
            continue
        for n in entries:
            try:
                ino = os.stat("/proc/%s/ns/%s" % (p, n)).st_ino
            except OSError:
                continue
            if ino in theirs:
                found.setdefault(theirs[ino], "/proc/%s/ns/%s" % (p, n))
    if found:
        def join(path=next(iter(found.values()))):
            fd = os.open(path, os.O_RDONLY)
            return sc("setns", fd, 0)

        res = in_child(join)
        OPEN("the target's namespaces are reachable: %s (setns: %s)" % (found, res))
    own = os.open("/proc/self/ns/uts", os.O_RDONLY)
    res = in_child(lambda: sc("setns", own, 0))
    return "none of the target's namespaces is reachable; setns(own uts): %s" % (
        "ok" if res[0] == 0 else en(res[1]))


@probe("pivot-root")
def p_pivot_root(target):
    # pivot_root checks CAP_SYS_ADMIN before it looks the paths up.
    r, e = sc("pivot_root", b"/nonexistent-escape-probe", b"/nonexistent-escape-probe")
    if e != EPERM:
        OPEN("pivot_root got %s, not EPERM: it is permitted" % en(e))
    return "pivot_root: EPERM"


def read_secrets():
    """Which of the secrets the VM must not see are readable (path -> content)."""
    out = {}
    for path in (ctx["hidden_secret"], ctx["victim_secret_on_host"]):
        try:
            data = open(path).read()
        except OSError:
            continue
        if NONCE in data:
            out[path] = data
    return out


@probe("chroot-breakout")
def p_chroot_breakout(target):
    d = tempfile.mkdtemp(prefix="escape-")

    def breakout():
        try:
            os.chroot(d)
        except OSError as e:
            return "chroot: %s" % en(e.errno)
        # The working directory stays outside the new root: climb from there, then chroot to
        # wherever that ends (the classic escape).
        for _ in range(64):
            os.chdir("..")
        os.chroot(".")
        found = read_secrets()
        if found:
            OPEN("after chroot(..) the hidden files are readable: %s" % sorted(found))
        return "chroot escape lands on the VM's own root: %s" % sorted(os.listdir("/"))[:8]

    try:
        return in_child(breakout)
    finally:
        os.rmdir(d)


@probe("hidden-paths")
def p_hidden_paths(target):
    notes = []
    for secret in (ctx["hidden_secret"], ctx["victim_secret_on_host"]):
        for prefix in ("", "/proc/self/root", "/proc/1/root", "/proc/thread-self/root", "/..",
                       "/proc/self/cwd/../../../../../.."):
            path = prefix + secret
            try:
                data = open(path).read()
            except OSError as e:
                notes.append("%s: %s" % (path, en(e.errno)))
                continue
            if NONCE in data:
                OPEN("%s is readable" % path)
    return "%d paths tried, none readable" % len(notes)


# ---------------------------------------------------------------- devices


@probe("mknod")
def p_mknod(target):
    major, minor = ctx["host_root_dev"]
    notes = []
    for base in ("/dev/shm", "/tmp", "/var/tmp", "/dev"):
        try:
            d = tempfile.mkdtemp(prefix="escape-", dir=base)
        except OSError as e:
            notes.append("%s: %s" % (base, en(e.errno)))
            continue
        node = os.path.join(d, "disk")
        try:
            os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(major, minor))
        except OSError as e:
            notes.append("mknod in %s: %s" % (base, en(e.errno)))
            continue
        else:
            try:
                with open(node, "rb") as f:
                    what = "and read %d bytes of the host's disk" % len(f.read(512))
            except OSError as e:
                what = "(open: %s)" % en(e.errno)
            OPEN("made a block device node %d:%d in %s %s" % (major, minor, base, what))
        finally:
            if os.path.lexists(node):
                os.unlink(node)
            os.rmdir(d)
    return "; ".join(notes)


@probe("raw-disk")
def p_raw_disk(target):
    paths = list(ctx["host_block_devices"])
    for pattern in ("/dev/[shv]d?", "/dev/xvd?", "/dev/nvme*n?", "/dev/mmcblk?", "/dev/dm-*",
                    "/dev/loop[0-9]*", "/dev/mapper/*"):
        paths += glob.glob(pattern)
    notes = []
    for p in dict.fromkeys(paths):
        try:
            with open(p, "rb") as f:
                n = len(f.read(512))
            OPEN("%s opened and %d bytes read" % (p, n))
        except OSError as e:
            notes.append("%s: %s" % (p, en(e.errno)))
    return "; ".join(notes)


@probe("dev-mem")
def p_dev_mem(target):
    notes = []
    for p in ("/dev/mem", "/dev/kmem", "/dev/port"):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as e:
            notes.append("%s: %s" % (p, en(e.errno)))
            continue
        os.close(fd)
        OPEN("%s opened" % p)
    return "; ".join(notes)


@probe("dev-kmsg")
def p_dev_kmsg(target):
    notes = []
    for flags, what in ((os.O_WRONLY, "write"), (os.O_RDONLY | os.O_NONBLOCK, "read")):
        try:
            fd = os.open("/dev/kmsg", flags)
        except OSError as e:
            notes.append("%s: %s" % (what, en(e.errno)))
            continue
        os.close(fd)
        OPEN("/dev/kmsg opens for %s: the host's kernel log" % what)
    return "/dev/kmsg: " + "; ".join(notes)


@probe("syslog")
def p_syslog(target):
    n, e = sc("syslog", 10, None, 0)  # SYSLOG_ACTION_SIZE_BUFFER
    if n > 0:
        OPEN("syslog(SIZE_BUFFER) = %d: the host's kernel log is readable" % n)
    buf = ctypes.create_string_buffer(4096)
    m, e2 = sc("syslog", 3, buf, 4096)  # SYSLOG_ACTION_READ_ALL (does not consume)
    if m > 0:
        OPEN("syslog(READ_ALL) read %d bytes of the host's kernel log" % m)
    return "syslog: %s, %s" % (en(e), en(e2))


@probe("proc-kmsg")
def p_proc_kmsg(target):
    try:
        fd = os.open("/proc/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return "/proc/kmsg: %s" % en(e.errno)
    os.close(fd)  # Never read: that would take the messages away from the host's syslog.
    OPEN("/proc/kmsg opens")


@probe("host-device-inodes")
def p_host_device_inodes(target):
    notes = []
    for path, (dev, ino) in ctx["host_devices"].items():
        try:
            st = os.stat(path)
        except OSError as e:
            notes.append("%s: %s" % (path, en(e.errno)))
            continue
        if (st.st_dev, st.st_ino) != (dev, ino):
            notes.append("%s is a node of our own" % path)
            continue
        # The host's own inode: any change of its metadata changes the host's device node.
        # Write back what is there (mode and owner unchanged).
        for what, change in (("chmod", lambda: os.chmod(path, stat.S_IMODE(st.st_mode))),
                             ("chown", lambda: os.chown(path, st.st_uid, st.st_gid))):
            try:
                change()
            except OSError as e:
                notes.append("%s %s: %s" % (what, path, en(e.errno)))
                continue
            OPEN("%s of the host's %s is permitted (the same inode as on the host)" % (what, path))
    return "; ".join(notes)


@probe("terminal-injection")
def p_terminal_injection(target):
    import termios
    notes = []
    master, slave = os.openpty()
    try:
        for what, request in (("TIOCSTI", termios.TIOCSTI), ("TIOCSTI|1<<32", termios.TIOCSTI | (1 << 32))):
            r, e = sc("ioctl", slave, request, ctypes.c_char_p(b"x"))
            if r == 0:
                OPEN("ioctl(%s) pushed input into a terminal" % what)
            notes.append("%s: %s" % (what, en(e)))
    finally:
        os.close(master)
        os.close(slave)
    return "; ".join(notes)


# ---------------------------------------------------------------- kernel code and features


def allowed_errno(e):
    return e not in (EPERM, errno.ENOSYS)


@probe("kernel-modules")
def p_kernel_modules(target):
    notes = []
    with tempfile.TemporaryFile() as empty:
        # An empty image: the kernel checks CAP_SYS_MODULE, then refuses it.
        r, e = sc("finit_module", empty.fileno(), b"", 0)
        notes.append("finit_module: %s" % en(e))
        if allowed_errno(e):
            OPEN("finit_module got %s: loading modules is permitted" % en(e))
    r, e = sc("init_module", None, 0, b"")
    notes.append("init_module: %s" % en(e))
    if allowed_errno(e):
        OPEN("init_module got %s: loading modules is permitted" % en(e))
    r, e = sc("delete_module", b"escape_probe_no_such_module", os.O_NONBLOCK)
    notes.append("delete_module: %s" % en(e))
    if allowed_errno(e):
        OPEN("delete_module got %s: unloading modules is permitted" % en(e))
    return "; ".join(notes)


@probe("kexec")
def p_kexec(target):
    # 1000 segments (the limit is 16) and unknown flags: refused after the permission check.
    r, e = sc("kexec_load", 0, 1000, None, 0)
    r2, e2 = sc("kexec_file_load", -1, -1, 0, b"", 0x7FFF0000)
    for what, err in (("kexec_load", e), ("kexec_file_load", e2)):
        if allowed_errno(err):
            OPEN("%s got %s: loading a new kernel is permitted" % (what, en(err)))
    return "kexec_load: %s; kexec_file_load: %s" % (en(e), en(e2))


@probe("bpf")
def p_bpf(target):
    attr = ctypes.create_string_buffer(struct.pack("=IIII", 2, 4, 4, 1) + bytes(56))
    fd, e = sc("bpf", 0, attr, 72)  # BPF_MAP_CREATE, an array of one entry
    if fd >= 0:
        os.close(fd)
        OPEN("bpf(BPF_MAP_CREATE) returned a map")
    # BPF_PROG_LOAD of a socket filter: r0 = 0; exit.
    insns = ctypes.create_string_buffer(struct.pack("=BBhi", 0xB7, 0, 0, 0) + struct.pack("=BBhi", 0x95, 0, 0, 0))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(struct.pack("=IIQQ", 1, 2, ctypes.addressof(insns),
                                                   ctypes.addressof(lic)) + bytes(104))
    fd2, e2 = sc("bpf", 5, attr, 128)
    if fd2 >= 0:
        os.close(fd2)
        OPEN("bpf(BPF_PROG_LOAD) loaded a program")
    return "map: %s; program: %s" % (en(e), en(e2))


@probe("perf-events")
def p_perf_events(target):
    # A software CPU clock over every process on CPU 0 (pid -1), created disabled.
    attr = ctypes.create_string_buffer(struct.pack("=IIQQQQ", 1, 64, 0, 0, 0, 1) + bytes(24))
    fd, e = sc("perf_event_open", attr, -1, 0, -1, 8)
    if fd >= 0:
        os.close(fd)
        OPEN("perf_event_open of every process on CPU 0 succeeded")
    return "perf_event_open: %s" % en(e)


@probe("userfaultfd")
def p_userfaultfd(target):
    notes = []
    for flags in (os.O_CLOEXEC, os.O_CLOEXEC | 1):  # 1: UFFD_USER_MODE_ONLY
        fd, e = sc("userfaultfd", flags)
        if fd >= 0:
            os.close(fd)
            OPEN("userfaultfd(%#x) returned a descriptor" % flags)
        notes.append("userfaultfd(%#x): %s" % (flags, en(e)))
    try:
        os.close(os.open("/dev/userfaultfd", os.O_RDWR))
        OPEN("/dev/userfaultfd opened")
    except OSError as e:
        notes.append("/dev/userfaultfd: %s" % en(e.errno))
    return "; ".join(notes)


@probe("io-uring")
def p_io_uring(target):
    params = ctypes.create_string_buffer(120)
    fd, e = sc("io_uring_setup", 4, params)
    if fd >= 0:
        os.close(fd)
        # Stricter than needed: a ring at all would let IORING_OP_CONNECT pass interception.
        OPEN("io_uring_setup returned a ring")
    r, e2 = sc("io_uring_enter", -1, 0, 0, 0, None, 0)
    r, e3 = sc("io_uring_register", -1, 0, None, 0)
    return "io_uring_setup: %s; enter: %s; register: %s" % (en(e), en(e2), en(e3))


class FileHandle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("f", ctypes.c_ubyte * 128)]


@probe("name-to-handle")
def p_name_to_handle(target):
    notes = []
    for path in ("/etc/passwd", "/run/shuttle/shuttle", "/dev/null", "/"):
        fh, mount_id = FileHandle(128, 0), ctypes.c_int()
        r, e = sc("name_to_handle_at", AT_FDCWD, path.encode(), ctypes.byref(fh), ctypes.byref(mount_id), 0)
        if r == 0:
            OPEN("name_to_handle_at(%s) returned a handle" % path)
        notes.append("%s: %s" % (path, en(e)))
    return "; ".join(notes)


@probe("open-by-handle")
def p_open_by_handle(target):
    # "Shocker": a handle for the root directory (inode 2) of an ext4 file system, opened
    # relative to any mount of that file system the VM holds (a bind mount from the host).
    notes = []
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        point, fstype = fields[4], fields[fields.index("-") + 1]
        if fstype not in ("ext4", "ext3", "ext2"):
            continue
        try:
            # A real descriptor: open_by_handle_at does not take O_PATH ones.
            mfd = os.open(point, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        fh = FileHandle(8, 1)  # FILEID_INO32_GEN: inode 2, generation 0
        struct.pack_into("=II", fh.f, 0, 2, 0)
        fd, e = sc("open_by_handle_at", mfd, ctypes.byref(fh), os.O_RDONLY | os.O_DIRECTORY)
        os.close(mfd)
        if fd >= 0:
            names = sorted(os.listdir(fd))[:10]
            os.close(fd)
            OPEN("opened the root of the %s file system under %s by handle: %s" % (fstype, point, names))
        notes.append("%s (%s): %s" % (point, fstype, en(e)))
    return "; ".join(notes) or "no ext* mount to try"


# ---------------------------------------------------------------- cgroups


def cgroup_mounts():
    """(mount point, root in the hierarchy, type, super options) of every cgroup mount."""
    out = []
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        i = f.index("-")
        if f[i + 1] in ("cgroup", "cgroup2"):
            out.append((f[4], f[3], f[i + 1], set(f[i + 3].split(","))))
    return out


def own_cgroup_dirs():
    """(mount point, path below it) of the cgroups this process is in, wherever mounted."""
    dirs = []
    for line in open("/proc/self/cgroup"):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        for point, root, fstype, opts in cgroup_mounts():
            if controllers:
                if fstype != "cgroup" or not set(controllers.split(",")) <= opts:
                    continue
            elif fstype != "cgroup2":
                continue
            if root == "/" or path == root or path.startswith(root + "/"):
                rel = path[len(root):] if root != "/" else path
                dirs.append((point, rel or "/"))
    return dirs


def cgroup_files(name, depth=3):
    out = []
    for point, _, _, _ in cgroup_mounts():
        base = point.count("/")
        for root, subdirs, files in os.walk(point):
            if root.count("/") - base >= depth:
                subdirs[:] = []
            if name in files:
                out.append(os.path.join(root, name))
    return sorted(set(out))


@probe("cgroup-release-agent")
def p_cgroup_release_agent(target):
    notes = [open_for_write(cgroup_files("release_agent"))]
    if real_attempts():
        d = tempfile.mkdtemp(prefix="escape-")
        try:
            for opts in (b"rdma", b"memory", b"none,name=escape"):
                r, e = sc("mount", b"cgroup", d.encode(), b"cgroup", 0, opts)
                if r == 0:
                    OPEN("mounted a cgroup v1 hierarchy (%s): its release_agent runs on the host" % opts.decode())
                notes.append("mount cgroup %s: %s" % (opts.decode(), en(e)))
        finally:
            os.rmdir(d)
    return "; ".join(notes)


@probe("cgroup-other")
def p_cgroup_other(target):
    own = {os.path.normpath(root + path) for root, path in own_cgroup_dirs()}
    others = []
    for f in cgroup_files("cgroup.procs") + cgroup_files("tasks"):
        d = os.path.dirname(f)
        if not any(d == o or d.startswith(o + "/") for o in own):
            others.append(f)
    return open_for_write(others) if others else "no other cgroup is visible"


@probe("cgroup-parent")
def p_cgroup_parent(target):
    paths = []
    for root, path in own_cgroup_dirs():
        if path != "/":
            paths.append(os.path.normpath(root + os.path.dirname(path)) + "/cgroup.procs")
        paths.append(root + "/../cgroup.procs")
    return open_for_write(paths)


@probe("cgroup-own-limits")
def p_cgroup_own_limits(target):
    paths = []
    for root, path in own_cgroup_dirs():
        for f in ("memory.max", "memory.high", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
                  "pids.max", "cpu.max", "cpu.cfs_quota_us"):
            paths.append(os.path.normpath(root + path) + "/" + f)
    return open_for_write([p for p in paths if os.path.exists(p)]) if any(map(os.path.exists, paths)) \
        else "none of its own cgroup's limit files is visible"


# ---------------------------------------------------------------- /proc/sys, /sys and /proc


@probe("proc-sys-hostname")
def p_proc_sys_hostname(target):
    return open_for_write(["/proc/sys/kernel/hostname", "/proc/sys/kernel/domainname"])


@probe("sysrq-trigger")
def p_sysrq(target):
    return open_for_write(["/proc/sysrq-trigger"])


@probe("drop-caches")
def p_drop_caches(target):
    return open_for_write(["/proc/sys/vm/drop_caches"])


@probe("core-pattern")
def p_core_pattern(target):
    return open_for_write(["/proc/sys/kernel/core_pattern"])


@probe("usermode-helpers")
def p_usermode_helpers(target):
    return open_for_write(["/proc/sys/kernel/modprobe", "/proc/sys/kernel/hotplug",
                           "/proc/sys/kernel/poweroff_cmd", "/proc/sys/kernel/usermodehelper/bset"])


@probe("binfmt-misc")
def p_binfmt_misc(target):
    notes = [open_for_write(["/proc/sys/fs/binfmt_misc/register"])]
    if real_attempts():
        d = tempfile.mkdtemp(prefix="escape-")
        try:
            r, e = sc("mount", b"binfmt_misc", d.encode(), b"binfmt_misc", 0, None)
            if r == 0:
                OPEN("mounted binfmt_misc")
            notes.append("mount binfmt_misc: %s" % en(e))
        finally:
            os.rmdir(d)
    return "; ".join(notes)


@probe("uevent-helper")
def p_uevent_helper(target):
    return open_for_write(["/sys/kernel/uevent_helper"])


@probe("sysfs-writable")
def p_sysfs_writable(target):
    return open_for_write(["/sys/kernel/mm/transparent_hugepage/enabled", "/sys/power/state",
                           "/sys/class/net/lo/mtu", "/sys/kernel/profiling",
                           "/sys/module/printk/parameters/time", "/sys/block/*/queue/scheduler"])


@probe("kernel-memory")
def p_kernel_memory(target):
    notes = []
    try:
        with open("/proc/kcore", "rb") as f:
            if f.read(4) == b"\x7fELF":
                OPEN("/proc/kcore is readable")
            notes.append("/proc/kcore: empty")
    except OSError as e:
        notes.append("/proc/kcore: %s" % en(e.errno))
    with open("/proc/kallsyms") as f:
        for line in f:
            if int(line.split()[0], 16) != 0:
                OPEN("/proc/kallsyms shows kernel addresses: %s" % line.strip())
            break
    notes.append("/proc/kallsyms addresses are zero")
    return "; ".join(notes)


@probe("tracing")
def p_tracing(target):
    notes = [open_for_write(["/sys/kernel/tracing/trace_marker", "/sys/kernel/debug/tracing/trace_marker",
                             "/sys/kernel/tracing/tracing_on", "/sys/kernel/debug/tracing/tracing_on"])]
    if real_attempts():
        d = tempfile.mkdtemp(prefix="escape-")
        try:
            for fstype in (b"tracefs", b"debugfs"):
                r, e = sc("mount", b"none", d.encode(), fstype, 0, None)
                if r == 0:
                    OPEN("mounted %s: the host kernel's tracing" % fstype.decode())
                notes.append("mount %s: %s" % (fstype.decode(), en(e)))
        finally:
            os.rmdir(d)
    return "; ".join(notes)


@probe("fanotify")
def p_fanotify(target):
    # fanotify with a mount or file-system mark watches every access on the host's files.
    notes = []
    for flags in (0x4, 0x0):  # FAN_CLASS_CONTENT, FAN_CLASS_NOTIF
        fd, e = sc("fanotify_init", flags | 0x1, os.O_RDONLY)  # | FAN_CLOEXEC
        if fd >= 0:
            os.close(fd)
            OPEN("fanotify_init(%#x) returned a group" % flags)
        notes.append("fanotify_init(%#x): %s" % (flags, en(e)))
    return "; ".join(notes)


@probe("host-switches")
def p_host_switches(target):
    # Each checks its capability first, then fails on the argument: nothing changes.
    checks = (("acct(/nonexistent)", ("acct", b"/nonexistent-escape/acct")),
              ("reboot(bad magic)", ("reboot", 0, 0, 0, None)),
              ("swapon(/nonexistent)", ("swapon", b"/nonexistent-escape/swap", 0)),
              ("swapoff(/nonexistent)", ("swapoff", b"/nonexistent-escape/swap")),
              ("quotactl(/nonexistent)", ("quotactl", 0x800002, b"/nonexistent-escape", 0, None)))
    notes = []
    for what, call in checks:
        r, e = sc(*call)
        if e != EPERM:
            OPEN("%s got %s, not EPERM: it is permitted" % (what, en(e)))
        notes.append("%s: EPERM" % what)
    return "; ".join(notes)


@probe("io-ports")
def p_io_ports(target):
    res = in_child(lambda: sc("iopl", 3))
    if res[0] == 0:
        OPEN("iopl(3) succeeded: raw I/O ports")
    res2 = in_child(lambda: sc("ioperm", 0x80, 1, 1))
    if res2[0] == 0:
        OPEN("ioperm(0x80) succeeded: raw I/O ports")
    return "iopl: %s; ioperm: %s" % (en(res[1]), en(res2[1]))


# ---------------------------------------------------------------- host name and clock


@probe("hostname")
def p_hostname(target):
    name = socket.gethostname().encode()
    r, e = sc("sethostname", name, len(name))  # the name it already has
    if r == 0:
        OPEN("sethostname is permitted")
    domain = open("/proc/sys/kernel/domainname").read().strip().encode()
    r, e2 = sc("setdomainname", domain, len(domain))
    if r == 0:
        OPEN("setdomainname is permitted")
    return "sethostname: %s; setdomainname: %s" % (en(e), en(e2))


@probe("clock-set")
def p_clock_set(target):
    # settimeofday(NULL, NULL) only checks CAP_SYS_TIME; a timespec with 2e9 nanoseconds is
    # refused as invalid once the call gets past the filter.
    r, e = sc("settimeofday", None, None)
    if r == 0:
        OPEN("settimeofday is permitted (CAP_SYS_TIME)")
    ts = ctypes.create_string_buffer(struct.pack("=qq", 0, 2000000000))
    r, e2 = sc("clock_settime", 0, ts)
    if e2 != EPERM:
        OPEN("clock_settime(CLOCK_REALTIME) got %s, not EPERM" % en(e2))
    return "settimeofday: %s; clock_settime: %s" % (en(e), en(e2))


class Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("sec", ctypes.c_long), ("usec", ctypes.c_long), ("tick", ctypes.c_long),
                ("rest", ctypes.c_long * 8), ("tai", ctypes.c_int), ("pad", ctypes.c_int * 11)]


@probe("adjtimex")
def p_adjtimex(target):
    ADJ_TICK = 0x4000
    now = Timex()
    r, e = sc("adjtimex", ctypes.byref(now))
    if r < 0:
        return "adjtimex(read): %s" % en(e)
    notes = []
    for name, args in (("adjtimex", ()), ("clock_adjtime", (0,))):
        # Sets the tick to the value it has: needs CAP_SYS_TIME, changes nothing.
        tx = Timex()
        tx.modes, tx.tick = ADJ_TICK, now.tick
        r, e = sc(name, *args, ctypes.byref(tx))
        if r >= 0:
            OPEN("%s(ADJ_TICK) is permitted" % name)
        notes.append("%s(ADJ_TICK): %s" % (name, en(e)))
    return "; ".join(notes)


# ---------------------------------------------------------------- other VMs' files


def secret_in(path):
    try:
        return NONCE in open(path).read()
    except OSError:
        return False


@probe("lower-layer-writes")
def p_lower_layer_writes(target):
    # A host file seen through the VM's copy-on-write root: every change must land in a copy.
    path, (dev, ino) = ctx["host_cow_file"], ctx["host_cow_id"]
    notes = []
    for what, change in (("write", lambda: open(path, "r+").write("changed")),
                         ("truncate", lambda: os.truncate(path, 1)),
                         ("chmod", lambda: os.chmod(path, 0o600)),
                         ("utime", lambda: os.utime(path, (1, 1))),
                         ("setxattr", lambda: os.setxattr(path, "user.escape", b"1")),
                         ("link", lambda: os.link(path, path + ".link"))):
        try:
            change()
        except OSError as e:
            notes.append("%s: %s" % (what, en(e.errno)))
            continue
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            OPEN("%s changed the host's own inode" % what)
        notes.append("%s: in a copy" % what)
    return "; ".join(notes)


@probe("upper-state-dir")
def p_upper_state_dir(target):
    rel = ctx["victim_secret"]
    candidates = [ctx["victim_secret_on_host"]]
    for base in (ctx["state_dir"], "/var/lib/shuttle"):
        candidates += glob.glob(base + "/vms/*/upper" + rel)
    for c in candidates:
        if secret_in(c):
            OPEN("%s is readable" % c)
    return "%d candidates, none readable (%s: %s)" % (
        len(candidates), ctx["state_dir"], "exists" if os.path.exists(ctx["state_dir"]) else "absent")


@probe("upper-proc-root")
def p_upper_proc_root(target):
    rel = ctx["victim_secret"]
    t = fx("vm")
    pids, notes = target_pids(t)
    paths = ["/proc/%d/root%s" % (pid, rel) for pid, _ in pids]
    paths.append("/proc/%d/root%s" % (ctx["victim_init"], rel))
    paths += ["/proc/%s/root%s" % (p, rel) for p in os.listdir("/proc") if p.isdigit()]
    for p in paths:
        if secret_in(p):
            OPEN("%s is readable" % p)
    return "%d paths, none readable" % len(paths)


@probe("upper-mountinfo")
def p_upper_mountinfo(target):
    rel = ctx["victim_secret"]
    uppers = set()
    for p in ["self"] + [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            text = open("/proc/%s/mountinfo" % p).read()
        except OSError:
            continue
        for opt in text.replace(" ", ",").split(","):
            if opt.startswith("upperdir="):
                uppers.add(opt[len("upperdir="):])
    for u in uppers:
        for c in [u + rel] + glob.glob(os.path.dirname(os.path.dirname(u)) + "/*/upper" + rel):
            if secret_in(c):
                OPEN("%s (from an upperdir in mountinfo) is readable" % c)
    return "upper directories named in mountinfo: %s; none reachable" % sorted(uppers)


@probe("shuttle-files")
def p_shuttle_files(target):
    notes = []
    for p in ctx["shuttle_files"]:
        if not os.path.exists(p):
            notes.append("%s absent" % p)
            continue
        if os.statvfs(p).f_flag & os.ST_RDONLY:
            notes.append("%s read-only" % p)
        elif os.access(p, os.W_OK):
            OPEN("%s is writable" % p)
        if real_attempts():
            try:
                if os.path.isdir(p):
                    fd = os.open(p, os.O_TMPFILE | os.O_WRONLY, 0o600)
                else:
                    fd = os.open(p, os.O_WRONLY)
                os.close(fd)
                OPEN("%s opens for writing" % p)
            except OSError as e:
                notes.append("%s: %s" % (p, en(e.errno)))
    return "; ".join(notes)


# ---------------------------------------------------------------- races against the monitor


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@probe("nested-listener")
def p_nested_listener(target):
    # A process of the VM installs a seccomp filter of its own that sends connect to its own
    # listener (the newest filter's notification wins over the monitor's) and lets the call
    # continue: interception is bypassed, so the call must still reach nothing beyond the VM.
    path = os.path.join(fx(target)["dir"], "D.sock")
    parent_sock, child_sock = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            prog = struct.pack("=HBBI", 0x20, 0, 0, 0)            # ld [nr]
            prog += struct.pack("=HBBI", 0x15, 0, 1, 42)          # jeq connect
            prog += struct.pack("=HBBI", 0x06, 0, 0, 0x7FC00000)  # ret USER_NOTIF
            prog += struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)  # ret ALLOW
            buf = ctypes.create_string_buffer(prog)
            fprog = SockFprog(4, ctypes.addressof(buf))
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            listener = libc.syscall(ctypes.c_long(317), ctypes.c_long(1), ctypes.c_long(8),
                                    ctypes.byref(fprog))
            if listener < 0:
                child_sock.send(b"E%d" % ctypes.get_errno())
                os._exit(0)
            socket.send_fds(child_sock, [b"L"], [listener])
            data, err = connect(socket.AF_UNIX, path, timeout=5)
            child_sock.send(b"R" + (data if err is None else b"error " + err.encode()))
        finally:
            os._exit(0)
    msg, fds, _, _ = socket.recv_fds(parent_sock, 256, 1)
    if msg.startswith(b"E"):
        os.waitpid(pid, 0)
        return "seccomp(NEW_LISTENER): %s" % en(int(msg[1:]))
    listener = fds[0]
    notif = bytearray(80)
    fcntl.ioctl(listener, 0xC0502100, notif)  # SECCOMP_IOCTL_NOTIF_RECV
    notif_id = struct.unpack_from("=Q", notif)[0]
    resp = bytearray(struct.pack("=QqiI", notif_id, 0, 0, 1))  # FLAG_CONTINUE
    fcntl.ioctl(listener, 0xC0182101, resp)  # SECCOMP_IOCTL_NOTIF_SEND
    result = parent_sock.recv(512)
    os.waitpid(pid, 0)
    r = fixture_reply(result[1:])
    if r:
        OPEN("the continued connect reached %s:%s" % r)
    return "own listener got the connect and continued it: %s" % result[1:].decode(errors="replace")


def hammer(connect_once, seconds):
    """Calls connect_once() until `seconds` pass; counts where each call ended."""
    counts = {}
    deadline = time.time() + seconds
    while time.time() < deadline:
        outcome = connect_once()
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def judge(counts, escape):
    bad = {k: v for k, v in counts.items() if escape(k)}
    if bad:
        OPEN("reached %s: %s" % (bad, counts))
    return "outcomes: %s" % counts


@probe("symlink-race")
def p_symlink_race(target):
    return race_on(ctx["race"]["link"])


@probe("parent-race")
def p_parent_race(target):
    return race_on(ctx["race"]["parent_link"])


def race_on(path):
    def once():
        data, err = connect(socket.AF_UNIX, path, timeout=5)
        if err:
            return err
        r = fixture_reply(data)
        return "%s:%s" % r if r else "unknown:%r" % data

    counts = hammer(once, ctx["race"]["seconds"])
    return judge(counts, lambda k: k.startswith("host:"))


def flip(make_buffer, values, call, seconds):
    """A thread rewrites the buffer between values while the main thread calls call(buf)."""
    buf = make_buffer()
    raw = [ctypes.create_string_buffer(v, len(v)) for v in values]
    size = len(values[0])
    stop = []

    def flipper():
        while not stop:
            for v in raw:
                ctypes.memmove(buf, v, size)

    th = threading.Thread(target=flipper, daemon=True)
    th.start()
    try:
        return hammer(lambda: call(buf), seconds)
    finally:
        stop.append(1)
        th.join()


libc.connect.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


def flip_connect(family, values, seconds):
    def call(buf):
        s = socket.socket(family)
        s.settimeout(5)
        ctypes.set_errno(0)
        s.setblocking(True)
        r = libc.connect(s.fileno(), buf, len(values[0]))
        if r != 0:
            e = ctypes.get_errno()
            s.close()
            return en(e)
        try:
            peer = s.getpeername()
        except OSError:
            # Connected, then reset before anything was said (ENOTCONN). Every fixture server
            # names itself before closing, and logs every connection it accepts: a real escape
            # still shows there (the targets' hit logs fail the case on their own).
            s.close()
            return "reset"
        if family != socket.AF_UNIX and s.getsockname() == peer:
            # TCP simultaneous open: a connect to a port nobody listens on in the caller's own
            # VM, from the very same (ephemeral) port, connects the socket to itself. The
            # fixture's ports are ephemeral, so a few thousand tries hit it now and then.
            s.close()
            return "self-connect"
        # Every fixture server names itself at once; on a loaded machine "at once" can take
        # seconds, and a silent connection would be counted as open.
        s.settimeout(15)
        try:
            data = s.recv(200)
        except OSError:
            data = b""
        s.close()
        r = fixture_reply(data)
        return "%s:%s" % r if r else "connected:%r" % data

    return flip(lambda: ctypes.create_string_buffer(len(values[0])), values, call, seconds)


@probe("flip-unix")
def p_flip_unix(target):
    f = ctx["flip"]
    values = []
    for p in f["unix"]:
        values.append(struct.pack("=H", socket.AF_UNIX) + p.encode() + b"\0")
    assert len({len(v) for v in values}) == 1, "flip paths must have the same length"
    counts = flip_connect(socket.AF_UNIX, values, f["seconds"])
    return judge(counts, lambda k: k.endswith(":unix-D") or k.startswith("connected:"))


@probe("flip-tcp")
def p_flip_tcp(target):
    f = ctx["flip"]
    values = [struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton("127.0.0.1")) for port in f["tcp"]]
    values = [struct.pack("=H", socket.AF_INET) + v[2:] for v in values]
    counts = flip_connect(socket.AF_INET, values, f["seconds"])
    return judge(counts, lambda k: k.endswith(":tcp-D") or k.startswith("connected:"))


@probe("flip-mq")
def p_flip_mq(target):
    f = ctx["flip"]
    values = [n.encode() + b"\0" for n in f["mq"]]
    assert len({len(v) for v in values}) == 1, "flip names must have the same length"
    rt.mq_open.argtypes = [ctypes.c_void_p, ctypes.c_int]

    def call(buf):
        ctypes.set_errno(0)
        q = rt.mq_open(buf, os.O_RDONLY)
        if q < 0:
            return en(ctypes.get_errno())
        a = MqAttr()
        rt.mq_getattr(q, ctypes.byref(a))
        os.close(q)
        return "opened:%d" % a.curmsgs

    counts = flip(lambda: ctypes.create_string_buffer(len(values[0])), values, call, f["seconds"])
    return judge(counts, lambda k: k.startswith("opened:"))


# ----------------------------------------------------------------

if __name__ == "__main__":
    try:
        detail = PROBES[CASE](TARGET)
        print("VERDICT CLOSED", detail, flush=True)
    except Open as e:
        print("VERDICT OPEN", e, flush=True)
