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
        q = subprocess.run(
            [PSQL, "-h", "/run/postgresql", "-U", "shop", "-d", "shop", "-Atc",
             "select current_user, name, price from products order by name"],
            capture_output=True, text=True)
        body = (q.stdout or q.stderr).encode()
        self.send_response(200 if q.returncode == 0 else 502)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print("%s %s" % (self.address_string(), fmt % args), flush=True)


print("shop listening on 127.0.0.1:8080", flush=True)
http.server.HTTPServer(("127.0.0.1", 8080), Shop).serve_forever()
