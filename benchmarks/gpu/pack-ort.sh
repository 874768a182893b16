#!/bin/bash
# Run in the project's root, on the development machine. Packs onnxruntime-gpu (Python 3.12, the GPU
# machine's Python) for the lent H100 in as few device calls as possible: the wheel unpacked, then xz-compressed
# and split into parts of 51 MB under .ort/c1 .. .ort/cN (four for 1.31.1, against five wheel parts from
# ../shared/gpu/prepare-ort-gpu.sh), plus ftfy and wcwidth wheels under .whl/ for the CLIP tokenizer.
# run.sh reassembles either layout. .ort/ and .whl/ are git-ignored.
set -euo pipefail
V=${ORT_GPU_VERSION:-1.31.1}
grep -qx '/.ort/' .git/info/exclude 2>/dev/null || echo '/.ort/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$tmp/whl" "onnxruntime-gpu==$V"
python3 -m zipfile -e "$tmp"/whl/onnxruntime_gpu-*.whl "$tmp/site"
tar -C "$tmp/site" -cJf "$tmp/ort.tar.xz" .
rm -rf .ort && mkdir -p .ort
( cd "$tmp" && split -b 51m -d -a 1 ort.tar.xz ort.tar.xz. )
i=1; for p in "$tmp"/ort.tar.xz.[0-9]; do mkdir -p .ort/c$i; mv "$p" .ort/c$i/; i=$((i+1)); done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl ftfy wcwidth
ls -la .ort/c* .whl
