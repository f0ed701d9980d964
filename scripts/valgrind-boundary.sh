#!/usr/bin/env bash
# Memory check of the plugin boundary: the real host runs analyzers from the real plugin libraries on a
# tiny checkpoint, with tensors crossing both ways, under valgrind memcheck. Prints valgrind's verdict.
# Needs: `cargo xtask build` done, valgrind installed. Takes a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."
ids=$(mktemp --suffix .npy)
trap 'rm -f "$ids"' EXIT
python3 - "$ids" <<'PY'
import struct, sys
rows, cols, vocab = 4, 16, 103
header = "{'descr': '<i8', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, cols)
header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
data = b"".join(struct.pack("<q", (i * 7 + i // cols * 3) % vocab) for i in range(rows * cols))
open(sys.argv[1], "wb").write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data)
PY
valgrind --tool=memcheck --error-exitcode=3 --errors-for-leak-kinds=none \
  target/release/scalpel --plugins target/release/libscalpel_example_hello.so analyze -a weight-norms -a attn-rank -a attn-mass -a attn-entropy -a block-influence -a angular-distance \
  tests/data/tiny-llama --calib "$ids" 2>&1 >/dev/null | grep -E "ERROR SUMMARY|Invalid|uninitialised" | sort | uniq -c
