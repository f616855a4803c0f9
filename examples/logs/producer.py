"""A producer of examples/logs: one connection to the collector, a line every half second.
Exits (and is restarted by its supervisor) when the collector goes away."""
import socket
import sys
import time

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
host = socket.gethostname()
print("%s connected to %s" % (host, sys.argv[1]), flush=True)
n = 0
while True:
    n += 1
    s.sendall(("%s line %d\n" % (host, n)).encode())
    time.sleep(0.5)
