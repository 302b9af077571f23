#!/usr/bin/env bash
# Prepare the Serve stack (Ray 2.60 + serve extras + our app's other imports) for the GPU machine, which has no
# network, no Ray and takes at most 64 MiB of ignored files per `run`.
#
# Runs HERE (a machine that reaches PyPI), from the repo root:  bash bench/gpu_serve/prepare.sh
#   1. downloads cp312 manylinux wheels of bench/gpu_serve/requirements.txt and their dependencies into
#      .gpu_serve/wheels/ (kept: a second call downloads nothing new);
#   2. leaves out what bench/gpu_serve/skip.txt names (on the GPU machine already, carried in .whl/, or optional);
#   3. installs the rest, as pip does on Python 3.12 (`pip install --no-deps --target`), into .gpu_serve/stage/;
#   4. packs that tree into ONE solid tar.xz (xz -9 takes ~25 % off the zip-compressed wheels: without it the
#      stack does not fit two runs), splits it into pieces of at most PART_MB (default 58 MiB, under the 64 MiB a
#      run carries) and lays them out as .gpu_serve/part1/, .gpu_serve/part2/, ... each with the MANIFEST (sha256
#      of the whole archive and of every piece); the integrator's .whl/ (~6 MB) rides with the last, smallest one.
# bench/gpu_serve/install.sh joins the pieces there, checks every sha256 and unpacks into /tmp/site.
# The carry lists of the runs are printed at the end (and documented in bench/gpu_serve/README.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/bench/gpu_serve
WORK=$ROOT/.gpu_serve
PIP=${PIP:-$ROOT/.venv/bin/pip}
PART_MB=${PART_MB:-58}
XZ_LEVEL=${XZ_LEVEL:-9}
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux1_x86_64
           --platform manylinux_2_5_x86_64)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 "${PLATFORMS[@]}")

mkdir -p "$WORK/wheels"
echo "[prepare] downloading wheels (cp312, manylinux x86_64) into $WORK/wheels"
"$PIP" download -q "${TARGET[@]}" -d "$WORK/wheels" -r "$HERE/requirements.txt" 2>&1 | grep -v "is ignored: it is neither" || true

# the wheels to ship: all downloaded ones whose normalized distribution name is not in skip.txt
mapfile -t SKIP < <(grep -v '^\s*#' "$HERE/skip.txt" | grep -v '^\s*$' | tr 'A-Z_.' 'a-z--')
SHIP=()
for wheel in "$WORK"/wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  skip=0
  for s in "${SKIP[@]}"; do [[ "$name" == "$s" ]] && skip=1; done
  if [[ $skip == 1 ]]; then echo "[prepare] leaving out $(basename "$wheel")"; else SHIP+=("$wheel"); fi
done

# the archive is rebuilt only when the set of wheels changed (xz -9 of ~600 MB takes minutes on 2 cores)
KEY=$( (for w in "${SHIP[@]}"; do basename "$w"; done | sort; echo "prune ray/jars") | sha256sum | cut -c1-16)
ARCHIVE=$WORK/serve-stack-$KEY.tar.xz
if [[ ! -f $ARCHIVE ]]; then
  rm -rf "$WORK/stage" "$WORK"/serve-stack-*.tar.xz
  echo "[prepare] installing ${#SHIP[@]} wheels into $WORK/stage (as pip would on Python 3.12)"
  "$PIP" install -q --no-index --no-deps --no-compile "${TARGET[@]}" --target "$WORK/stage" "${SHIP[@]}"
  rm -rf "$WORK/stage/bin"  # console scripts carry this machine's interpreter path; nothing uses them there
  # Ray's Java worker jars (33 MB, already zip-compressed: xz gains nothing on them); Python-only cluster here
  rm -rf "$WORK/stage/ray/jars"
  for w in "${SHIP[@]}"; do basename "$w"; done | sort > "$WORK/stage/.kimiray-serve-stack-wheels.txt"
  echo "[prepare] packing $(du -sh "$WORK/stage" | cut -f1) with xz -$XZ_LEVEL (a few minutes)"
  tar -C "$WORK/stage" -cf - . | xz "-$XZ_LEVEL" -T2 > "$ARCHIVE.tmp"
  mv "$ARCHIVE.tmp" "$ARCHIVE"
fi

rm -rf "$WORK"/part[0-9]* "$WORK/pieces"
mkdir -p "$WORK/pieces"
split -b "${PART_MB}M" -d -a 2 "$ARCHIVE" "$WORK/pieces/serve-stack.tar.xz.part"
mapfile -t PIECES < <(ls "$WORK/pieces")
N=${#PIECES[@]}
{
  echo "archive $(basename "$ARCHIVE") $(sha256sum "$ARCHIVE" | cut -d' ' -f1) $(stat -c %s "$ARCHIVE")"
  echo "parts $N"
  for p in "${PIECES[@]}"; do echo "piece $p $(sha256sum "$WORK/pieces/$p" | cut -d' ' -f1)"; done
} > "$WORK/MANIFEST"
for i in $(seq 1 "$N"); do
  mkdir -p "$WORK/part$i"
  mv "$WORK/pieces/${PIECES[$((i - 1))]}" "$WORK/part$i/"
  cp "$WORK/MANIFEST" "$WORK/part$i/"
done
rmdir "$WORK/pieces"
echo "[prepare] $(basename "$ARCHIVE"): $(stat -c %s "$ARCHIVE") bytes in $N parts of at most ${PART_MB} MiB"
for i in $(seq 1 "$N"); do
  size=$(du -sb "$WORK/part$i" | cut -f1)
  extra=""; [[ $i == "$N" ]] && extra=', ".whl"'  # the integrator's pydantic/llguidance wheels ride with the smallest piece
  echo "[prepare] run $i: carry [\".gpu_serve/part$i\"$extra] ($((size / 1048576)) MiB${extra:+ + .whl})   command: bash bench/gpu_serve/install.sh"
done
echo "[prepare] the last run may instead be: bash bench/gpu_runs/e18.sh (it calls install.sh first)"
