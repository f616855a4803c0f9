"""The web shop of examples/shop: serves its catalogue, read from PostgreSQL in VM db.

It runs in VM shop, which has no database: psql's connect to /run/postgresql/.s.PGSQL.5432
reaches VM db's server only because the policy's `connect` rule routes it there.
"""
import http.server
import subprocess
import sys

PSQL = sys.argv[1] if len(sys.argv) > 1 else "psql"


class Shop(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/invoice":
            return self.invoice()
        q = subprocess.run(
            [PSQL, "-h", "/run/postgresql", "-U", "shop", "-d", "shop", "-Atc",
             "select current_user, name, price from products order by name"],
            capture_output=True, text=True)
        body = (q.stdout or q.stderr).encode()
        self.send_response(200 if q.returncode == 0 else 502)
        self.end_headers()
        self.wfile.write(body)

    def invoice(self):
        """Writes an invoice and prints it on VM printer: /usr/local/bin/print-invoice is, in
        this VM, a stub Shuttle placed there for the `invoke` rule; the program runs in VM
        printer and sees the invoice file at /shuttle/from/shop/srv/shop/invoices/..."""
        q = subprocess.run(
            [PSQL, "-h", "/run/postgresql", "-U", "shop", "-d", "shop", "-Atc",
             "select name, price from products order by name"],
            capture_output=True, text=True)
        path = "/srv/shop/invoices/invoice.txt"
        with open(path, "w") as f:
            f.write(q.stdout)
        p = subprocess.run(["/usr/local/bin/print-invoice", path], capture_output=True, text=True)
        self.send_response(200 if p.returncode == 0 else 502)
        self.end_headers()
        self.wfile.write((p.stdout or p.stderr).encode())

    def log_message(self, fmt, *args):
        print("%s %s" % (self.address_string(), fmt % args), flush=True)


print("shop listening on 127.0.0.1:8080", flush=True)
http.server.HTTPServer(("127.0.0.1", 8080), Shop).serve_forever()
