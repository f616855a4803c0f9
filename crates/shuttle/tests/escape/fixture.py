# Targets for the escape probes (crates/shuttle/tests/escape.rs), run on the host and inside the
# victim VM: real listeners, IPC objects, a signal catcher with a secret in its memory, a named
# keyring. Anything that reaches one of them is logged as a line "HIT <channel>" in the log
# file, so the test sees what got through whatever the probe itself reports.
#
#   python3 -c FIXTURE '{"mode": "serve", ...}'   prints one line of JSON when ready
#   python3 -c FIXTURE '{"mode": "swap", ...}'    the symlink/rename racer of the race cases
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys
import time

cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.syscall.restype = ctypes.c_long
IPC_CREAT, IPC_EXCL, IPC_RMID = 0o1000, 0o2000, 0


def swap():
    """Swaps `link` between alternatives as fast as it can: hard links of `real` (a socket)
    and symlinks to each of `targets`, each put in place with an atomic rename."""
    link, real, targets = cfg["link"], cfg.get("real"), cfg["targets"]
    tmp = link + ".tmp"
    alternatives = [("link", real)] if real else []
    alternatives += [("symlink", t) for t in targets]
    deadline = time.time() + cfg["seconds"]
    print("swapping", flush=True)
    n = 0
    while time.time() < deadline:
        kind, what = alternatives[n % len(alternatives)]
        n += 1
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if kind == "link":
            os.link(what, tmp)
        else:
            os.symlink(what, tmp)
        os.replace(tmp, link)
    print("swapped", n, flush=True)


if cfg["mode"] == "swap":
    swap()
    sys.exit(0)

where, nonce = cfg["where"], cfg["nonce"]
d = cfg["dir"]
tag = "escape-fixture-%s-%s" % (where, nonce)
log = open(cfg["log"], "a", buffering=1)


def hit(channel):
    log.write("HIT %s\n" % channel)


def reply(channel):
    return ("FIXTURE %s %s %s\n" % (where, channel, nonce)).encode()


cleanups = []


def cleanup():
    for f in reversed(cleanups):
        try:
            f()
        except Exception:
            pass
    cleanups.clear()


def daemonize():
    # The parent prints the readiness line the child sends it, and exits: `shuttle run` returns
    # and the fixture lives on in the VM.
    r, w = os.pipe()
    if os.fork():
        os.close(w)
        line = os.read(r, 65536)
        sys.stdout.buffer.write(line)
        sys.exit(0)
    os.close(r)
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    return w


ready_fd = daemonize() if cfg.get("daemon") else None
if not cfg.get("daemon"):
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
signal.signal(signal.SIGTERM, lambda *_: (cleanup(), os._exit(0)))
signal.signal(signal.SIGUSR1, lambda *_: hit("signal"))
signal.signal(signal.SIGUSR2, lambda *_: hit("signal"))

os.makedirs(d, exist_ok=True)
streams = {}  # listening socket -> channel
dgrams = {}
fifos = {}


def unix_listener(path, channel, kind=socket.SOCK_STREAM):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path)
    os.chmod(path, 0o777)
    if kind == socket.SOCK_STREAM:
        s.listen(256)
        streams[s] = channel
    else:
        dgrams[s] = channel
    cleanups.append(lambda: os.unlink(path))
    return s


unix_listener(os.path.join(d, "D.sock"), "unix-D")
unix_listener(os.path.join(d, "x"), "unix-x")
unix_listener(os.path.join(d, "dgram.sock"), "unix-dgram", socket.SOCK_DGRAM)
a = socket.socket(socket.AF_UNIX)
a.bind("\0" + cfg["abstract"])
a.listen(64)
streams[a] = "abstract"

t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((cfg["tcp_bind"], 0))
t.listen(256)
streams[t] = "tcp-D"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((cfg["tcp_bind"], 0))
dgrams[u] = "udp"
ready = {
    "pid": os.getpid(),
    "tcp_port": t.getsockname()[1],
    "udp_port": u.getsockname()[1],
}
if cfg.get("allowed"):
    # What the policy lets the attacker reach: hits here are not escapes.
    unix_listener(os.path.join(d, "A.sock"), "allowed-unix")
    ta = socket.socket()
    ta.bind(("127.0.0.1", 0))
    ta.listen(256)
    streams[ta] = "allowed-tcp"
    ready["tcp_allowed_port"] = ta.getsockname()[1]
    unix_listener("/run/race/sock", "allowed-race")
    unix_listener("/run/race2/real/x", "allowed-race2")
    os.symlink("real", "/run/race2/d")
    os.link("/run/race/sock", "/run/race/x")

fifo = os.path.join(d, "fifo")
if not os.path.exists(fifo):
    os.mkfifo(fifo, 0o666)
cleanups.append(lambda: os.unlink(fifo))
for path in [fifo] + ([cfg["lower_fifo"]] if cfg.get("lower_fifo") else []):
    # Read and write: a reader that never sees end-of-file, so writers can open it.
    fifos[os.open(path, os.O_RDWR | os.O_NONBLOCK)] = "fifo"

# A secret in memory, for process_vm_readv and /proc/PID/mem.
secret = ctypes.create_string_buffer(("SECRET-%s-%s" % (where, nonce)).encode())
ready["secret_addr"] = ctypes.addressof(secret)

# SysV IPC objects with known keys, each holding the nonce where it can.
shm = libc.shmget(cfg["shm_key"], 4096, IPC_CREAT | IPC_EXCL | 0o600)
assert shm >= 0, "shmget: errno %d" % ctypes.get_errno()
cleanups.append(lambda: libc.shmctl(shm, IPC_RMID, None))
addr = libc.shmat(shm, None, 0)
ctypes.memmove(addr, nonce.encode(), len(nonce))
libc.shmdt(ctypes.c_void_p(addr))
sem = libc.semget(cfg["sem_key"], 1, IPC_CREAT | IPC_EXCL | 0o600)
assert sem >= 0, "semget: errno %d" % ctypes.get_errno()
cleanups.append(lambda: libc.semctl(sem, 0, IPC_RMID))
msq = libc.msgget(cfg["msg_key"], IPC_CREAT | IPC_EXCL | 0o600)
assert msq >= 0, "msgget: errno %d" % ctypes.get_errno()
cleanups.append(lambda: libc.msgctl(msq, IPC_RMID, None))
m = struct.pack("l", 1) + nonce.encode()
assert libc.msgsnd(msq, m, len(nonce), 0) == 0

# POSIX message queues, each holding the nonce.
rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.restype = ctypes.c_int
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
rt.mq_send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint]
for name in cfg["mqueues"]:
    q = rt.mq_open(name.encode(), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600, None)
    assert q >= 0, "mq_open %s: errno %d" % (name, ctypes.get_errno())
    assert rt.mq_send(q, nonce.encode(), len(nonce), 0) == 0
    cleanups.append(lambda name=name: rt.mq_unlink(name.encode()))

with open(cfg["shm_file"], "w") as f:
    f.write(nonce)
cleanups.append(lambda: os.unlink(cfg["shm_file"]))

if cfg.get("secret_file"):
    os.makedirs(os.path.dirname(cfg["secret_file"]), exist_ok=True)
    with open(cfg["secret_file"], "w") as f:
        f.write(nonce)

if cfg.get("keyring"):
    # A named session keyring holding a key: `keyctl join NAME` elsewhere would reach it.
    KEYCTL_JOIN_SESSION_KEYRING, KEY_SPEC_SESSION_KEYRING = 1, -3
    L = ctypes.c_long
    ring = libc.syscall(L(250), L(KEYCTL_JOIN_SESSION_KEYRING), cfg["keyring"].encode())
    assert ring > 0
    key = libc.syscall(L(248), b"user", b"escape-key", nonce.encode(), L(len(nonce)),
                       L(KEY_SPEC_SESSION_KEYRING))  # add_key
    assert key > 0
    # Every right for its owner (uid 0), as keyrings shared between services are set up:
    # without that, another process of the same uid could not find it by name.
    KEYCTL_SETPERM, ALL = 5, 0x3F3F0000
    for k in (ring, key):
        assert libc.syscall(L(250), L(KEYCTL_SETPERM), L(k), L(ALL)) == 0

if cfg.get("with_addresses"):
    ready["ifaces"] = [n for _, n in socket.if_nameindex()]
    ips = []
    for name in ready["ifaces"]:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            req = struct.pack("256s", name.encode()[:15])
            ips.append(socket.inet_ntoa(__import__("fcntl").ioctl(s, 0x8915, req)[20:24]))
        except OSError:
            pass
    ready["ips"] = ips

line = (json.dumps(ready) + "\n").encode()
if ready_fd is not None:
    os.write(ready_fd, line)
    os.close(ready_fd)
else:
    sys.stdout.buffer.write(line)
    sys.stdout.flush()

deadline = time.time() + cfg.get("ttl", 600)
watched = list(streams) + list(dgrams) + list(fifos)
while time.time() < deadline:
    try:
        r, _, _ = select.select(watched, [], [], 1)
    except InterruptedError:
        continue
    for s in r:
        try:
            if s in streams:
                c, _ = s.accept()
                hit(streams[s])
                try:
                    c.sendall(reply(streams[s]))
                except OSError:
                    pass
                c.close()
            elif s in dgrams:
                data, peer = s.recvfrom(4096)
                hit(dgrams[s])
                if peer:
                    try:
                        s.sendto(reply(dgrams[s]), peer)
                    except OSError:
                        pass
            else:
                data = os.read(s, 4096)
                if data:
                    hit(fifos[s])
        except (BlockingIOError, InterruptedError):
            pass
cleanup()
