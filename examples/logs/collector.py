"""The collector of examples/logs: accepts connections on a unix socket and appends every
line it receives to one file, prefixed with the sender's host name and uid (the uid comes
from SO_PEERCRED: the kernel's word, not the sender's)."""
import os
import socket
import struct
import sys
import threading

path, out = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), exist_ok=True)
os.makedirs(os.path.dirname(out), exist_ok=True)
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o666)
server.listen(16)
lock = threading.Lock()
log = open(out, "a", buffering=1)
print("collecting on %s into %s" % (path, out), flush=True)


def serve(conn):
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", cred)
    with conn, conn.makefile("r") as lines:
        for line in lines:
            with lock:
                log.write("uid=%d %s" % (uid, line))


while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
