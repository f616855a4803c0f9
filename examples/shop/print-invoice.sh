#!/bin/sh
# The printer of examples/shop: lives in VM printer, where the shop invokes it through an
# `invoke` rule. Its argument is the shop's invoice file, which Shuttle shows here read-only at
# /shuttle/from/shop/PATH; it "prints" by appending to the printer's own spool.
set -eu
invoice=$1
spool=/tmp/printed-invoices.log
{ echo "== $(date -u +%FT%TZ) from $invoice"; cat "$invoice"; } >> "$spool"
echo "printed $(wc -l < "$invoice") lines on $(hostname) ($invoice)"
