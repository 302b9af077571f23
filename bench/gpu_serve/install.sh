#!/usr/bin/env bash
# Install the Serve stack that bench/gpu_serve/prepare.sh packed, on the GPU machine (no network), from the repo
# root:  bash bench/gpu_serve/install.sh   [SITE=/tmp/site]
#
# Idempotent; safe in every run:
# * the pieces .gpu_serve/part*/serve-stack.tar.xz.partNN arrive over consecutive runs (each run carries one
#   .gpu_serve/partN; the machine keeps ignored files in the repo folder while it stays warm);
# * while some are missing it says which, checks the ones present, and exits 0 (run 1 only parks its piece);
# * once all are there: sha256 of every piece and of the joined archive against the MANIFEST, then the archive
#   is unpacked into $SITE (the tree `pip install --no-deps --target` made from the wheels, Python 3.12);
# * if $SITE already holds this archive (marker file), nothing is done.
# Exit status 1 only on a real problem (a corrupt piece, a failed unpack, an import that fails afterwards).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$ROOT/.gpu_serve
SITE=${SITE:-/tmp/site}

manifest=$(ls "$WORK"/part*/MANIFEST 2>/dev/null | head -1 || true)
if [[ -z $manifest ]]; then
  echo "[install] no .gpu_serve/part*/ here: carry .gpu_serve/part1 (see bench/gpu_serve/README.md)"
  exit 0
fi
read -r _ archive_name archive_sha archive_size < <(grep '^archive ' "$manifest")
parts=$(awk '/^parts /{print $2}' "$manifest")
marker=$SITE/.kimiray-serve-stack
if [[ -f $marker && $(cat "$marker") == "$archive_sha" ]]; then
  echo "[install] $SITE already holds $archive_name: nothing to do"
  exit 0
fi

missing=()
paths=()
while read -r _ piece sha; do
  path=$(ls "$WORK"/part*/"$piece" 2>/dev/null | head -1 || true)
  if [[ -z $path ]]; then missing+=("$piece"); continue; fi
  got=$(sha256sum "$path" | cut -d' ' -f1)
  if [[ $got != "$sha" ]]; then
    echo "[install] CORRUPT piece $path: sha256 $got, MANIFEST says $sha"; exit 1
  fi
  echo "[install] piece $piece present, sha256 ok"
  paths+=("$path")
done < <(grep '^piece ' "$manifest")
if (( ${#missing[@]} )); then
  echo "[install] ${#paths[@]} of $parts pieces here; still missing: ${missing[*]} (carry the next .gpu_serve/partN;"
  echo "[install] if an earlier piece is reported missing, the machine was released between runs: start again at run 1)"
  exit 0
fi

started=$(date +%s.%N)
joined=$(mktemp /tmp/serve-stack.XXXXXX.tar.xz)
cat "${paths[@]}" > "$joined"
got=$(sha256sum "$joined" | cut -d' ' -f1)
if [[ $got != "$archive_sha" || $(stat -c %s "$joined") != "$archive_size" ]]; then
  rm -f "$joined"; echo "[install] the joined archive does not match the MANIFEST (sha256 $got)"; exit 1
fi
mkdir -p "$SITE"
python3 - "$joined" "$SITE" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as tar:
    tar.extractall(sys.argv[2], filter="data")
PY
rm -f "$joined"
echo "$archive_sha" > "$marker"
echo "[install] unpacked $archive_name ($archive_size bytes, $(wc -l < "$SITE/.kimiray-serve-stack-wheels.txt") wheels) into $SITE in $(python3 -c "import time,sys; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$started")s"
PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} python3 - <<'PY'
import importlib, sys
mods = ["yaml", "numpy", "pydantic", "ray", "ray.serve", "fastapi", "starlette", "uvicorn", "httpx", "openai", "av",
        "pymupdf", "redis", "multipart", "docx", "pydicom", "aiohttp", "grpc"]
good, bad = [], []
for name in mods:
    try:
        module = importlib.import_module(name)
        good.append(f"{name} {getattr(module, '__version__', '')}".strip())
    except Exception as exc:  # noqa: BLE001 - report every missing piece at once
        bad.append(f"{name}: {type(exc).__name__}: {exc}")
print(f"[install] imports ok: {', '.join(good)}")
for line in bad:  # yaml/numpy come from the machine's own stack; pydantic from .whl/ (skip.txt says why)
    print(f"[install] IMPORT FAILS {line}")
sys.exit(1 if bad else 0)
PY
