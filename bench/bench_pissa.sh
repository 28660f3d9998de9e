#!/usr/bin/env bash
# bench_pissa.sh - wall time of PiSSA initialisation (lora.init: pissa and
# pissa_niter_K) of a Llama-3.2-1B-shaped model (16 layers, D 2048, H 32,
# Hkv 8, d 64; targets q/k/v/o, r 8, BF16 weights) with build/bench/bench_pissa,
# on 1 rank x 2 threads and 2 ranks x 1 thread, and the same run's serial
# LAPACK reference (dgesvd and dgesdd of one matrix of each shape, 2 and 1
# threads). Prints figures and the load average; not a test.
#   [BUILD_DIR=build] bench/bench_pissa.sh [--layers-exact N (default 1)] [--niter K (default 4)] [--mlp]
# The exact SVD (pdgesvd) of a 2048 x 2048 matrix takes minutes on 2 cores,
# so it runs on --layers-exact layers and is extrapolated to 16 (every layer
# has the same shapes); the randomized variant runs all 16 layers.
set -euo pipefail
cd "$(dirname "$0")/.."
lex=1 niter=4 mlp=""
while [ $# -gt 0 ]; do
  case "$1" in
    --layers-exact) lex=$2; shift ;;
    --niter) niter=$2; shift ;;
    --mlp) mlp=--mlp ;;
    *) echo "usage: bench/bench_pissa.sh [--layers-exact N] [--niter K] [--mlp]" >&2; exit 2 ;;
  esac
  shift
done
B=${BUILD_DIR:-build}/bench/bench_pissa
[ -x "$B" ] || { [ -z "${BUILD_DIR:-}" ] && tools/build release >/dev/null; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_WAIT_POLICY=PASSIVE
mpi="mpirun --oversubscribe --bind-to none"
load() { echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs)"; }
echo "== $(date -u +%FT%TZ) $(uname -n)"
load
echo "== 1 rank x 2 threads"
OMP_NUM_THREADS=2 $B --layers 16 --niter "$niter" $mlp | sed '1,2d'
OMP_NUM_THREADS=2 $B --layers "$lex" --niter -1 --ref $mlp | sed -n '3,$p'
load
echo "== 2 ranks x 1 thread"
$mpi -np 2 -x OMP_NUM_THREADS=1 $B --layers 16 --niter "$niter" $mlp | sed '1,2d'
$mpi -np 2 -x OMP_NUM_THREADS=1 $B --layers "$lex" --niter -1 $mlp | sed -n '3,$p'
load
echo "== serial LAPACK reference on 1 thread"
OMP_NUM_THREADS=1 $B --layers "$lex" --niter none --ref $mlp | sed -n '4,$p'
load
