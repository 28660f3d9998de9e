#!/usr/bin/env bash
# bench_mmlu.sh - items per second of `tptt eval mmlu` (one-shot, both
# scorings) on a Llama-3.2-1B-shaped bf16 model with the real Llama 3
# tokenizer (from ../shared/fixtures; skipped visibly without it), on
# 1 rank x 2 threads and 2 ranks x 1 thread. Prints figures; not a test.
#   bench/bench_mmlu.sh [--layers N (default 16)] [--items N (default 8)] [--model DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
layers=16 items=8 model=""
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --items) items=$2; shift ;;
    --model) model=$2; shift ;;
    *) echo "usage: bench/bench_mmlu.sh [--layers N] [--items N] [--model DIR]" >&2; exit 2 ;;
  esac
  shift
done
tok=../shared/fixtures/tokenizers/llama3
if [ -z "$model" ] && [ ! -f "$tok/tokenizer.json" ]; then
  echo "SKIP: bench_mmlu needs the Llama 3 tokenizer in $tok (or --model DIR with its own)"; exit 0
fi
T=build/tptt
[ -x "$T" ] || tools/build release >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/bench_mmlu.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -z "$model" ]; then
  model=$work/model
  echo "writing a Llama-3.2-1B-shaped bf16 model ($layers layers) ..."
  $T init-model --arch llama --layers "$layers" --hidden 2048 --heads 32 --kv-heads 8 --ffn 8192 \
    --vocab 128256 --tie --rope-theta 500000 --dtype bf16 --seed 1 "$model" >/dev/null
  cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$model"/
fi
# synthetic MMLU items of real-looking length (a one-shot prompt ~ 250 tokens)
/usr/bin/python3 - "$work" "$items" <<'PY'
import json, random, sys
w, n = sys.argv[1], int(sys.argv[2])
r = random.Random(1)
words = ("the of a model energy force mass light wave field charge particle law system value "
         "function process state time space number rate change theory result").split()
def sent(k): return " ".join(r.choice(words) for _ in range(k)).capitalize()
def item(i): return {"subject": "physics", "question": sent(40) + "?", "choices": [sent(8) for _ in range(4)],
                     "answer": i % 4}
with open(w + "/dev.jsonl", "w") as f: f.write(json.dumps(item(0)) + "\n")
with open(w + "/test.jsonl", "w") as f:
    for i in range(n): f.write(json.dumps(item(i + 1)) + "\n")
PY
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run() { # label, then the command
  local label=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$@" --model "$model" --data "$work/test.jsonl" --dev "$work/dev.jsonl" --report "$work/r.json" >/dev/null 2>"$work/err" \
    || { cat "$work/err" >&2; exit 1; }
  t1=$(date +%s.%N)
  /usr/bin/python3 -c "import json,sys; r=json.load(open('$work/r.json')); t=$t1-$t0; print('%-28s %5d items  %7.1f s  %6.3f items/s  (acc %.3f)' % ('$label', r['items'], t, r['items']/t, r['metrics']['acc']['micro']))"
}
echo "model: $model ($layers layers + 128256-token tied head), tokenizer: Llama 3; $items one-shot items"
OMP_NUM_THREADS=2 run "1 rank x 2 threads" $T eval mmlu
OMP_NUM_THREADS=1 run "2 ranks x 1 thread" mpirun --oversubscribe --bind-to none -np 2 $T eval mmlu
