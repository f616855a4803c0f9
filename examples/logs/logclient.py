"""The collector's client library: how to send lines to the collector. It lives in VM
collector (copied there by `shuttle up`) and reaches the producers as a component: each
producer VM sees collector's /srv/collector/lib read-only at /opt/collector-lib."""
import socket


class LogClient:
    def __init__(self, path, name):
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def send(self, line):
        self.sock.sendall(("%s %s\n" % (self.name, line)).encode())
