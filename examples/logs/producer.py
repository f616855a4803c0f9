"""A producer of examples/logs: one connection to the collector, a line every half second,
through the collector's client library (a component from VM collector, on PYTHONPATH).
Exits (and is restarted by its supervisor) when the collector goes away."""
import socket
import sys
import time

from logclient import LogClient

host = socket.gethostname()
client = LogClient(sys.argv[1], host)
print("%s connected to %s" % (host, sys.argv[1]), flush=True)
n = 0
while True:
    n += 1
    client.send("line %d" % n)
    time.sleep(0.5)
