#!/usr/bin/env bash
# bench_step.sh - the whole training step of a Llama-3.2-1B-shaped Titan
# (bf16 weights, LoRA r=8 on q/k/v/o, LiZA delta_product, MaG mu = 0.5,
# the 128256-token tied head) with `tptt train`, and in the same run the
# PyTorch reference on the same shape (bench/pytorch_step.py: fp32, the
# reference package's LinearAttentionOp computation, its layers scaled to
# ours). Prints s/step, tokens/s, dense GFLOP/s and their share of the GEMM
# rate `tptt train` measures at start-up (metrics.jsonl), then ours / PyTorch
# tokens/s (issue 16 target >= 5x) and our share of the GEMM rate (target
# >= 85% at seq 512, >= 75% at seq 4096 with recompute). Not a test.
#   bench/bench_step.sh [--layers N (2)] [--seq N (512)] [--ranks N (1)] [--cores N (2)]
#                       [--steps N (3)] [--batch N (2)] [--recompute 0|1 (1 above seq 1024)]
#                       [--pt-layers N (2, at most --layers)] [--no-pytorch] [--model DIR] [--keep DIR]
#                       [--matmul auto|f32|bf16 (auto)] [--perf FILE.data]
# --matmul: compute.matmul (auto: oneDNN bf16 where the CPU has AVX512_BF16,
#   else OpenBLAS sgemm); the share printed is of that backend's rate.
# --perf: run ours under `perf record -g` (into FILE.data) and print the
#   shares of the step's samples: sgemm/oneDNN, bf16 conversion, LiZA,
#   softmax attention, exp, thread waiting, MPI, kernel, other. Threads
#   asleep (tptt sets OMP_WAIT_POLICY=PASSIVE) take no samples: waiting shows
#   as fewer CPU-seconds than wall-seconds x cores (the "cpu:" line, whole
#   run with start-up; on a shared machine other jobs lower it too).
# --cores: threads in all (ranks x threads per rank; PyTorch gets all of them).
# --model DIR: an existing model with --layers layers (else one is written
#   under $TMPDIR or /tmp and removed); --keep DIR: keep metrics.jsonl, the
#   config (bench/lora-liza-step.yaml and its --set overrides, sets.txt) and
#   the trainer's stderr there.
# --batch: sequences per step over all ranks (a multiple of --ranks).
# The first step (page faults of the mapped weights, first-touch buffers) is
# left out; the best and the mean of the others are printed.
# TPTT=path/to/tptt picks another binary (default build/tptt).
set -euo pipefail
cd "$(dirname "$0")/.."
layers=2 seq=512 ranks=1 cores=2 steps=3 batch=2 recompute="" ptl="" pytorch=1 model="" keep="" perf="" matmul=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --seq) seq=$2; shift ;;
    --ranks) ranks=$2; shift ;;
    --cores) cores=$2; shift ;;
    --steps) steps=$2; shift ;;
    --batch) batch=$2; shift ;;
    --recompute) recompute=$2; shift ;;
    --pt-layers) ptl=$2; shift ;;
    --no-pytorch) pytorch=0 ;;
    --model) model=$2; shift ;;
    --keep) keep=$2; shift ;;
    --perf) perf=$2; shift ;;
    --matmul) matmul=$2; shift ;;
    *) echo "usage: bench/bench_step.sh [--layers N] [--seq N] [--ranks N] [--cores N] [--steps N] [--batch N]" \
            "[--recompute 0|1] [--pt-layers N] [--no-pytorch] [--model DIR] [--keep DIR] [--matmul auto|f32|bf16] [--perf FILE.data]" >&2; exit 2 ;;
  esac
  shift
done
if [ $((batch % ranks)) -ne 0 ] || [ "$steps" -lt 2 ] || [ $((cores % ranks)) -ne 0 ]; then
  echo "bench_step: --batch and --cores must be multiples of --ranks, --steps at least 2" >&2; exit 2
fi
[ -n "$recompute" ] || { [ "$seq" -gt 1024 ] && recompute=1 || recompute=0; }
[ -n "$ptl" ] || ptl=$((layers < 2 ? layers : 2))
threads=$((cores / ranks))
T=${TPTT:-build/tptt}
[ -x "$T" ] || tools/build release >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/bench_step.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -z "$model" ]; then
  model=$work/model
  echo "writing a Llama-3.2-1B-shaped bf16 model ($layers layers + tied 128256-token head) ..."
  $T init-model --arch llama --layers "$layers" --hidden 2048 --heads 32 --kv-heads 8 --ffn 8192 \
    --vocab 128256 --tie --rope-theta 500000 --dtype bf16 --seed 1 "$model" >/dev/null
fi
# random token documents of one row each (no short remainder rows: every row
# has seq - 1 labelled tokens), enough for every step; ids below the vocabulary
/usr/bin/python3 - "$work/data.jsonl" "$((steps * batch + 2))" "$seq" <<'PY'
import json, random, sys
path, rows, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(1)
with open(path, "w") as f:
    for _ in range(rows):
        f.write(json.dumps({"ids": [r.randrange(128256) for _ in range(seq)]}) + "\n")
PY
$T make-shard --jsonl --vocab 128256 -o "$work/data.tok" "$work/data.jsonl" >/dev/null
# the step of bench/lora-liza-step.yaml with this run's settings
sets=(--set "model.path=$model" --set "run.dir=$work/run" --set "data.path=$work/data.tok" --set "data.seq_len=$seq"
      --set "batch.global=$batch" --set "schedule.total_steps=$steps" --set "compute.matmul=$matmul"
      --set "compute.recompute=$([ "$recompute" = 1 ] && echo true || echo false)")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ours: tptt train, $layers layers + head, seq $seq, $batch sequences per step, $ranks rank(s) x $threads thread(s)," \
  "matmul $matmul, recompute $recompute, $steps steps (first left out)"
prof=()
[ -z "$perf" ] || prof=(perf record -g -F 250 -o "$perf" --)
train() {
  if [ "$ranks" -eq 1 ]; then
    OMP_NUM_THREADS=$threads "${prof[@]}" $T train bench/lora-liza-step.yaml "${sets[@]}"
  else
    OMP_NUM_THREADS=$threads "${prof[@]}" mpirun --oversubscribe --bind-to none -np "$ranks" \
      -x OMP_NUM_THREADS -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM $T train bench/lora-liza-step.yaml "${sets[@]}"
  fi
}
TIMEFORMAT="%R %U %S"
if ! { time train >"$work/out" 2>"$work/err"; } 2>"$work/time"; then cat "$work/err" >&2; exit 1; fi
read -r wall usr sys <"$work/time"
echo "  cpu: $usr s user + $sys s sys over $wall s wall x $cores cores" \
  "= $(awk -v u="$usr" -v s="$sys" -v w="$wall" -v c="$cores" 'BEGIN { printf "%.0f", 100 * (u + s) / (w * c) }')% busy" \
  "(whole run: start-up, every step, checkpoint)"
grep -h "^efficiency:\|matmul$" "$work/err" | sed 's/^/  /' || true
[ -z "$keep" ] || { mkdir -p "$keep" && cp "$work/run/metrics.jsonl" bench/lora-liza-step.yaml "$work/err" "$keep"/ &&
                    printf '%s %s\n' "${sets[@]}" >"$keep/sets.txt"; }
/usr/bin/python3 - "$work/run/metrics.jsonl" "$ranks" >"$work/ours" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][1:]  # the first step is warm-up
best = max(rows, key=lambda r: r["tokens_per_s"])
mean = lambda k: sum(r[k] for r in rows) / len(rows)
s = lambda r: r["tokens"] / r["step"] / r["tokens_per_s"]  # seconds of that step
print(json.dumps(dict(best_tps=best["tokens_per_s"], mean_tps=mean("tokens_per_s"), best_s=s(best),
                      gflops=best["gflops"], share=best["gflops_share"], mean_share=mean("gflops_share"),
                      rate=best["matmul_gflops"], steps=len(rows), ranks=int(sys.argv[2]))))
PY
/usr/bin/python3 - "$work/ours" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))
print("  ours: %.2f s/step, %.2f tokens/s (mean of %d steps %.2f), %.1f dense GFLOP/s per rank = %.0f%% of the"
      " %.1f GFLOP/s GEMM rate per rank (mean share %.0f%%)" % (o["best_s"], o["best_tps"], o["steps"], o["mean_tps"],
      o["gflops"], 100 * o["share"], o["rate"], 100 * o["mean_share"]))
PY
if [ -n "$perf" ]; then
  echo "  sampling profile of ours ($perf, samples of the tptt processes (comm tptt or exe), self time):"
  perf report -i "$perf" --comm tptt,exe --stdio --no-children -F sample,dso,sym -g none -t '|' 2>/dev/null \
    | /usr/bin/python3 -c '
import re, sys
cats = ["sgemm/oneDNN", "bf16 conversion", "LiZA (kernel + gates)", "softmax attention", "exp", "thread waiting",
        "MPI", "kernel (other)", "other"]
tot = dict.fromkeys(cats, 0.0)
top = {}
def cat(dso, sym):
    # oneDNN JIT code has no file: perf shows it as "[JIT] tid N" (or [unknown], //anon)
    if re.search(r"openblas|dnnl|JIT|unknown|anon|perf-[0-9]+[.]map", dso) or re.search(r"sgemm|dnnl|jit", sym):
        return cats[0]
    # weights to fp32 for sgemm; activations to bf16 for oneDNN (the loop in bf16_matmul)
    if re.search(r"weight_f32|widen_bf16|tp_to_f32|tp_from_f32|f16_to_f32|f32_to_f16|bf16_to|to_bf16|bf16_matmul[.]_omp", sym):
        return cats[1]
    if re.search(r"liza|chunk_fwd|expand_(f32|f64|bwd)|phi_f|row_bases|ws_alloc|feature_(fwd|bwd)|gate_vec|build_f", sym):
        return cats[2]
    if re.search(r"attn|softmax_row|block_probs", sym): return cats[3]
    if re.search(r"libm[.-]", dso) or re.search(r"(^|_)expf?(_|$|\b)", sym): return cats[4]
    if re.search(r"gomp", dso) or re.search(r"sched_yield|futex|gomp_|do_sched_yield|__schedule|yield", sym): return cats[5]
    if re.search(r"libmpi|open-pal|open-rte|libfabric|libucp|libucs|mca_|btl|pmix", dso + sym): return cats[6]
    if "kernel" in dso: return cats[7]
    return cats[8]
for line in sys.stdin:
    f = line.strip().split("|")
    if len(f) < 3 or not f[0].strip().isdigit(): continue
    pct, dso, sym = float(f[0]), f[1].strip(), re.sub(r"^\[.\]\s*", "", f[2].strip())
    c = cat(dso, sym)
    tot[c] += pct
    top.setdefault(c, []).append((pct, sym))
n = sum(tot.values()) or 1
for c in cats:
    names = ", ".join("%s %.1f" % (s[:40], 100 * p / n) for p, s in sorted(top.get(c, []), reverse=True)[:3])
    print("    %-22s %5.1f%%   (%s)" % (c, 100 * tot[c] / n, names))
print("    (%d samples)" % n)
'
fi
[ "$pytorch" = 1 ] || exit 0
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "PyTorch reference: $ptl layers built, scaled to $layers, + head, $cores threads:"
/usr/bin/python3 bench/pytorch_step.py --layers "$ptl" --scale-to "$layers" --seq "$seq" --threads "$cores" \
  --iters 1 >"$work/pt" 2>&1 || { cat "$work/pt" >&2; exit 1; }
grep -v '^JSON ' "$work/pt" | sed 's/^/  /'
sed -n 's/^JSON //p' "$work/pt" >"$work/pt.json"
/usr/bin/python3 - "$work/ours" "$work/pt.json" "$seq" "$recompute" <<'PY'
import json, sys
o, p = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
seq, rec = int(sys.argv[3]), sys.argv[4] == "1"
target = 0.85 if seq <= 512 else 0.75
print("ours / PyTorch tokens/s: %.2f / %.2f = %.1fx (target >= 5x)" % (o["best_tps"], p["tokens_per_s"],
      o["best_tps"] / p["tokens_per_s"]))
print("our share of the GEMM rate: %.0f%% (target >= %.0f%% at seq %d%s)" % (100 * o["share"], 100 * target, seq,
      ", recompute on" if rec else ""))
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
