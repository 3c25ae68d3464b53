#!/bin/sh
# Build the C plugins for wasm32 with clang + wasm-ld (Debian: apt-get install clang lld).
# usage: build.sh OUT_DIR [NAME...]   (default: every *.c here)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT_DIR [NAME...]}
shift
mkdir -p "$out"
if [ $# -eq 0 ]; then
    set -- $(cd "$here" && ls *.c | sed 's/\.c$//')
fi
for name in "$@"; do
    clang --target=wasm32 -O2 -nostdlib -ffreestanding -fno-builtin \
        -Wall -Wextra -Werror \
        -Wl,--no-entry -Wl,--strip-all -Wl,-z,stack-size=65536 \
        -o "$out/$name.wasm" "$here/$name.c"
done
