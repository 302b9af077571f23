# Sourced by the GPU scripts here (repo root is the working directory on the GPU machine): installs the pydantic /
# llguidance wheels carried in .whl/ into /tmp/site (the machine has neither), puts the tree and /tmp/site on the
# path, turns off Ray's usage stats and the Hub, makes $OUT and prints the card.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" || true
export PYTHONPATH=/tmp/site:$PWD
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

summary() {  # JSON LOG: the decode rows of an engine_bench JSON (batch, tok/s, ms/step, replay ms, of bound), or LOG's tail
  python3 -c 'import json,sys
for r in json.load(open(sys.argv[1]))["decode"]:
    print(r["batch"], r["tok_per_s"], r["ms_per_step"], r.get("graph_replay_ms"), r.get("fraction_of_bound"))' "$1" \
    2>/dev/null || tail -5 "$2" | cut -c1-300
}
