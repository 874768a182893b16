#!/bin/bash
# On the GPU machine, in the repository root: put onnxruntime-gpu and edgefm on the path, then run gpu_check.py.
#
# onnxruntime-gpu arrives as parts under /tmp/ort (benchmarks/gpu/README.md says how), either the wheel split
# by ../shared/gpu/prepare-ort-gpu.sh (part0..) or, smaller, its unpacked tree as a split .tar.xz (ort.tar.xz.*).
# Extra wheels (ftfy, wcwidth) come from .whl/ when carried. Results go to $OUT (default ./gpu-out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" /tmp/ortsite /tmp/efm/edgefm
if [ ! -d /tmp/ortsite/onnxruntime ]; then
  if ls /tmp/ort/ort.tar.xz.* >/dev/null 2>&1; then
    cat /tmp/ort/ort.tar.xz.* > /tmp/ort.tar.xz
    python3 -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/ortsite')" || exit 2
  else
    cat /tmp/ort/part* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    python3 -m pip install -q --no-index --no-deps --target /tmp/ortsite \
      /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl || exit 2
  fi
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
fi
# edgefm without installing: a namespace package whose parts are this checkout's folders.
for d in models export runtime; do ln -sfn "$PWD/$d" /tmp/efm/edgefm/$d; done
export PYTHONPATH=/tmp/ortsite:/tmp/site:/tmp/efm:$PWD PYTHONUNBUFFERED=1
python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
python3 benchmarks/gpu/gpu_check.py --out "$OUT" "$@"
