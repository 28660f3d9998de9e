#!/usr/bin/env bash
# bench_7b.sh - Mistral-7B-shaped LoRA + LiZA training on one node (issue 16).
#
# usage: bench/bench_7b.sh [MODEL_DIR]        (default /work/bigmodel/mistral7b)
#   env: TPTT (default build/tptt), PY (default /usr/bin/python3),
#        WORK (scratch dir, default /tmp/tptt-bench-7b), STEPS (default 1),
#        CASES (default "512:1:2 512:2:1"; SEQ:RANKS:THREADS, e.g. add 4096:1:2)
#
# 1. If MODEL_DIR has no config.json, writes the bf16 Mistral-7B-shaped model
#    (14.5 GB, 3 shards) with `tptt init-model` and prints the time.
# 2. Writes a few thousand random token ids as a token shard.
# 3. For every case: `tptt inspect --json` (the predicted private bytes per
#    rank, recompute on), then `tptt train` (LoRA r=8 on q,k,v,o + LiZA
#    delta_product, recompute on, micro-batch 1, one row per rank and step)
#    under bench/memsample.py, which samples every rank's RssAnon / Rss / Pss
#    from /proc. Prints per rank: predicted vs measured private memory, and the
#    trainer's tokens/s, GFLOP/s and share of the start-up GEMM rate (from
#    metrics.jsonl), with the load average of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${TPTT:-build/tptt}
PY=${PY:-/usr/bin/python3}
M=${1:-/work/bigmodel/mistral7b}
W=${WORK:-/tmp/tptt-bench-7b}
STEPS=${STEPS:-1}
CASES=${CASES:-"512:1:2 512:2:1"}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$W"

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [ ! -f "$M/config.json" ]; then
  echo "== init-model (OMP_NUM_THREADS=${OMP_NUM_THREADS:-all cores}) -> $M"
  s=$(date +%s.%N)
  "$T" init-model --arch mistral --layers 32 --hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 \
    --vocab 32768 --dtype bf16 --shards 3 --force "$M"
  echo "init-model: $(echo "$(date +%s.%N) - $s" | bc) s, load average $(cut -d' ' -f1-3 /proc/loadavg)"
fi

if [ ! -f "$W/data.tok" ]; then
  "$PY" - "$W/data.jsonl" <<'EOF'
import json, random, sys
rnd = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(8):  # 8 documents of 5000 tokens: rows of up to 4096 tokens for 2 ranks x 2 steps
        f.write(json.dumps({"ids": [rnd.randrange(3, 32768) for _ in range(5000)]}) + "\n")
EOF
  "$T" make-shard --jsonl -o "$W/data.tok" "$W/data.jsonl" >/dev/null
fi

for c in $CASES; do
  IFS=: read -r seq ranks threads <<<"$c"
  name="seq${seq}-r${ranks}x${threads}"
  run="$W/run-$name"
  rm -rf "$run"
  # the step of bench/lora-liza-step.yaml with this case's settings
  sets=(--set "model.path=$M" --set "run.dir=$run" --set "data.path=$W/data.tok" --set "data.seq_len=$seq"
        --set "batch.global=$ranks" --set "schedule.total_steps=$STEPS" --set mag.mode=learnable)
  echo "== $name: seq $seq, $ranks rank(s) x $threads thread(s), $STEPS step(s); load average $(cut -d' ' -f1-3 /proc/loadavg)"
  "$T" inspect --json --seq-len "$seq" --lora-rank 8 "$M" >"$W/$name.inspect.json"
  set +e
  OMP_NUM_THREADS=$threads "$PY" bench/memsample.py --interval 0.05 --name "$(basename "$T")" --json "$W/$name.mem.json" -- \
    mpirun --oversubscribe --bind-to none -np "$ranks" -x OMP_NUM_THREADS "$T" train bench/lora-liza-step.yaml "${sets[@]}" \
    >"$W/$name.log" 2>&1
  rc=$?
  set -e
  grep -E '^memsample|step|error' "$W/$name.log" | tail -n 8
  "$PY" - "$W/$name.inspect.json" "$W/$name.mem.json" "$run/metrics.jsonl" "$name" <<'EOF'
import json, os, sys
ins, mem, met, name = sys.argv[1:5]
p = json.load(open(ins))["memory"]
m = json.load(open(mem))
g = 1 << 30
pred = p["private_bytes_recompute"]
print(f"{name}: inspect predicts private {pred / g:.2f} GiB per rank (trainables {p['trainable_bytes'] / g:.3f}, "
      f"activations {p['activation_bytes_recompute'] / g:.2f}, scratch {p['scratch_bytes'] / g:.2f}), "
      f"frozen mapped {p['frozen_mapped_bytes'] / g:.2f} GiB shared")
for i, r in enumerate(m["ranks"]):
    print(f"{name}: rank {i}: measured peak RssAnon {r['RssAnon'] / g:.2f} GiB = {r['RssAnon'] / pred:.3f} x predicted; "
          f"peak Rss {r['Rss'] / g:.2f} GiB, Pss {r['Pss'] / g:.2f} GiB")
print(f"{name}: wall {m['wall_s']:.0f} s, load average {m['load1_start']:.2f} -> {m['load1_end']:.2f} "
      f"(mean {m['load1_mean']:.2f}), rc {m['rc']}")
if os.path.exists(met):
    for line in open(met):
        r = json.loads(line)
        if "tokens_per_s" in r:
            print(f"{name}: step {r['step']}: elapsed {r['elapsed_s']:.0f} s, {r['tokens_per_s']:.2f} tokens/s, "
                  f"{r.get('gflops', 0):.1f} GFLOP/s = {100 * r.get('gflops_share', 0):.0f}% of the start-up "
                  f"GEMM rate ({r.get('matmul_gflops', 0):.1f} GFLOP/s), loss {r.get('loss', float('nan')):.4f}")
EOF
  [ "$rc" = 0 ] || echo "$name: train exited with $rc (see $W/$name.log)"
done
