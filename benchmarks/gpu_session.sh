#!/usr/bin/env bash
# The whole first GPU session in one command (docs/performance.md, "The GPU session").
#
#   bash benchmarks/gpu_session.sh                 # on the GPU machine: results into $OUT
#   bash benchmarks/gpu_session.sh --dry-run       # here: CPU, TRITON_INTERPRET=1, tiny sizes
#   bash benchmarks/gpu_session.sh --fetch-wheels  # here, once: the wheels the GPU machine lacks
#
# Steps, in this order, each in its own process under its own `timeout`: env, wheels, tests
# (tests/test_gpu.py, -x off), sanitizer (memcheck, racecheck, synccheck), speed (N=2),
# pipeline (SD1.5 UNet + 2 ControlNets), backward, speed_n3. A step that fails or times out
# is recorded and the next one runs. The whole run stays within GPU_SESSION_BUDGET seconds
# (default 420: 7 minutes): a step gets at most what is left, and none starts with less than
# 10 s left. After every step $OUT holds three files: summary.json, summary.md, logs.tar.gz
# (every step's log and result), so a run killed at any point still returns data.
# Environment: OUT (default ./gpu-session-out), PYTHON (default python3), GPU_SESSION_BUDGET,
# GPU_SESSION_STEPS (comma-separated subset), GPU_SESSION_STEP_TIMEOUT (cap on every step),
# GPU_SESSION_FAIL (NAME or NAME:hang, a deliberate failure: the test of the survival).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=0
FETCH=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) sed -n 2,19p "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
# What the GPU machine lacks (its package list: /work/.library/device/KINDS.md): diffusers and
# the one requirement of diffusers it does not have (importlib_metadata; zipp, filelock,
# huggingface-hub >= 1.32, numpy, regex, requests, safetensors >= 0.8 and Pillow are there),
# and greenlet (maxfusion_hooks' lockstep runner).
WHEELS="diffusers==0.42.1 greenlet==3.5.6 importlib_metadata==10.2.0"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

if [ "$FETCH" = 1 ]; then
  mkdir -p .whl
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS -d .whl $WHEELS || exit 1
  ls -l .whl
  du -sh .whl
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-session-out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu-session.XXXXXX)
BUDGET=${GPU_SESSION_BUDGET:-420}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 GPU_SESSION_DRY=1
else
  unset TRITON_INTERPRET
  export GPU_SESSION_DRY=0
fi
printf 'step\trc\tseconds\ttimeout\n' > "$WORK/steps.tsv"

wanted() {  # is step $1 in GPU_SESSION_STEPS (all when unset)?
  [ -z "${GPU_SESSION_STEPS:-}" ] && return 0
  case ",$GPU_SESSION_STEPS," in *",$1,"*) return 0 ;; esac
  return 1
}

pack() {
  "$PY" benchmarks/gpu_session.py pack --work "$WORK" --out "$OUT" >>"$WORK/pack.log" 2>&1 \
    || tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude=./site .
}

# run_step NAME TIMEOUT COMMAND...: output into $WORK/NAME.log, a row in steps.tsv, then pack
run_step() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local now left cap t0 rc
  now=$(date +%s)
  left=$((BUDGET - (now - START) - 10))  # 10 s kept for the last packing
  cap=${GPU_SESSION_STEP_TIMEOUT:-}
  if [ -n "$cap" ] && [ "$cap" -lt "$limit" ]; then limit=$cap; fi
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped\t0\t0\n' "$name" >> "$WORK/steps.tsv"
    echo "== $name: skipped ($left s of the budget left)"
    pack
    return 0
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "== $name (timeout ${limit} s, $((now - START)) s into the run)"
  t0=$(date +%s)
  GPU_SESSION_LIMIT=$limit timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >> "$WORK/steps.tsv"
  echo "   rc $rc in $(($(date +%s) - t0)) s; last lines:"
  tail -n 3 "$WORK/$name.log" | cut -c1-200 | sed 's/^/   | /'
  pack
  return 0
}

STEP=("$PY" benchmarks/gpu_session.py step)  # + NAME --work "$WORK"

run_step env 30 "${STEP[@]}" env --work "$WORK"

# wheels: installed with --no-index --target before anything imports them
SITE=$WORK-site
install_wheels() {
  local whl=(.whl/*.whl)
  if [ ! -e "${whl[0]}" ]; then
    echo "no wheels in .whl/ (fetch them here with: bash benchmarks/gpu_session.sh --fetch-wheels)"
    [ "$GPU_SESSION_DRY" = 1 ]  # a dry run goes on (this machine has the packages); else fail
    return
  fi
  ls -l "${whl[@]}"
  if [ "$GPU_SESSION_DRY" = 1 ]; then
    # the same wheels, installed for the GPU machine's Python 3.12 (not importable here)
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
      --target "$SITE" "${whl[@]}"
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${whl[@]}"
  fi || return
  ls "$SITE"
}
export -f install_wheels
export PY SITE PLATFORMS
run_step wheels 60 bash -c install_wheels
if [ "$DRY" != 1 ] && [ -d "$SITE" ]; then export PYTHONPATH="$SITE:$PYTHONPATH"; fi

# precompile: the kernel variants of every later step, compiled for sm_90 under the fake driver
# (benchmarks/analysis/offline_cuda.py; nothing runs on the GPU) in K processes side by side,
# into Triton's on-disk cache, which the later steps then load from (compile time is most of
# the tests' time otherwise: docs/performance.md)
precompile() {
  local k=$1 steps=$2 i pids=() rc=0
  for ((i = 0; i < k; i++)); do
    env -u TRITON_INTERPRET "$PY" benchmarks/gpu_session.py census --arch 90 --shard "$i/$k" \
      ${steps:+--steps "$steps"} --out "$WORK/precompile_$i.json" > "$WORK/precompile_$i.txt" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=$?; done
  tail -n 4 "$WORK"/precompile_*.txt
  return $rc
}
export -f precompile
export WORK
if [ "$DRY" = 1 ]; then
  run_step precompile 60 bash -c "precompile 2 backward"
else
  NPROC=$(nproc 2>/dev/null || echo 4)
  K=$((NPROC > 4 ? NPROC - 2 : 2))
  run_step precompile 90 bash -c "precompile $K ''"
fi

run_step tests 150 "${STEP[@]}" tests --work "$WORK"

# compute-sanitizer around a small target; refused or missing: said so in its log
sanitize() {
  local tool=$1
  if command -v compute-sanitizer >/dev/null 2>&1; then
    compute-sanitizer --tool "$tool" --print-limit 20 "$PY" benchmarks/gpu_session.py \
      sanitize-target
  else
    echo "compute-sanitizer: not found; the target runs without it"
    "$PY" benchmarks/gpu_session.py sanitize-target
  fi
}
export -f sanitize
if wanted sanitizer; then
  for tool in memcheck racecheck synccheck; do
    GPU_SESSION_STEPS='' run_step "sanitizer_$tool" 45 bash -c "sanitize $tool"
  done
  run_step sanitizer 20 "${STEP[@]}" sanitizer --work "$WORK"
fi

run_step speed 100 "${STEP[@]}" speed --work "$WORK"
run_step pipeline 120 "${STEP[@]}" pipeline --work "$WORK"
run_step backward 40 "${STEP[@]}" backward --work "$WORK"
run_step speed_n3 60 "${STEP[@]}" speed_n3 --work "$WORK"

pack
rm -rf "$SITE"
echo
echo "== done in $(($(date +%s) - START)) s; files in $OUT:"
ls -l "$OUT"
echo
cat "$OUT/summary.md"
rm -rf "$WORK"
