#!/usr/bin/env bash
# One prepared check for a lent GPU machine (one H100/H200), in under 8 minutes:
#   setup   what the machine has; installs mamba-ssm / causal-conv1d (and pydantic) if they are missing:
#           from a folder of wheels first (offline), else from PyPI when it can be reached (sdists only:
#           compiled here, within the setup limit), else the pure path is measured and the summary says so
#   parity  bench/gpu_parity.py: kernel vs pure outputs and gradients (scan, conv, whole model; fp32, bf16)
#   model   bench/gpu_model.py: one released-width block, seq 4096, bf16, speed and memory, kernels on / off
#   train   bench/gpu_train.py: the same block as a training step (checkpointing, chunked loss): tokens/s, MFU
# Each step writes DIR/<step>.json; DIR/summary.json combines them; everything else goes to DIR/gpu_check.log.
#
#   bash bench/gpu_check.sh [DIR]          DIR: default $OUT if set, else bench/results/gpu
#
# Optional environment:
#   PYTHON                     interpreter with (or to get) torch with CUDA; default python3
#   GPU_WHEELS                 folder of wheels to install offline; default .whl, else shared/device-wheels
#   GPU_CHECK_SITE             install target (pip --target, put first on PYTHONPATH); default /tmp/gpu-check-site
#   GPU_CHECK_{SETUP,PARITY,MODEL,TRAIN}_S   step limits in seconds; default 45, 100, 140, 100: with the
#                              setup report (20 s), each step's kill grace (10 s) and the summary (20 s) at
#                              most 455 s in all
#   GPU_CHECK_REQUIRE_KERNELS=1  the scripts get --require-kernels (exit 2 at once without kernels)
#   GPU_CHECK_DRY_RUN=1        install nothing and ask no registry; the steps still run (without CUDA each one
#                              reports why and exits 3 at once): how this script is tested on a CPU machine
#
# Exit status: 0 kernels present, every parity check passed, every step ran; 1 a parity check failed;
# 2 kernels unavailable (pure path measured, parity not run); 3 no CUDA device; 4 a step crashed or timed out.
set -u

cd "$(dirname "$0")/.." || exit 4
DIR=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$DIR" || exit 4
LOG=$DIR/gpu_check.log
: >"$LOG"
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
DRY=${GPU_CHECK_DRY_RUN:-0}
LIMIT_SETUP=${GPU_CHECK_SETUP_S:-45}
LIMIT_PARITY=${GPU_CHECK_PARITY_S:-100}
LIMIT_MODEL=${GPU_CHECK_MODEL_S:-140}
LIMIT_TRAIN=${GPU_CHECK_TRAIN_S:-100}
REQUIRE=()
[ "${GPU_CHECK_REQUIRE_KERNELS:-0}" = 1 ] && REQUIRE=(--require-kernels)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }

# ------------------------------------------------------------------------------------------------ setup
SETUP_START=$SECONDS
SETUP_NOTES=$DIR/.setup_notes          # one line per action, folded into setup.json then removed
: >"$SETUP_NOTES"
note() { log "setup: $*"; printf '%s\n' "$*" >>"$SETUP_NOTES"; }
left() { echo $((LIMIT_SETUP - (SECONDS - SETUP_START))); }
# pip's own waits are short so that an unreachable registry answers within the setup limit
pip_in() { local limit; limit=$(left); [ "$limit" -gt 5 ] || return 124
           timeout "$limit" "$PY" -m pip install -q --no-compile --timeout 10 --retries 0 --upgrade --target "$SITE" "$@" >>"$LOG" 2>&1; }
kernels_ok() { timeout 60 "$PY" -c 'from model.scan import kernel_status; ok, why = kernel_status(); print(why); raise SystemExit(0 if ok else 1)' 2>>"$LOG"; }
REGISTRY=unknown
registry_ok() {  # asked once: can pip fetch a small package from its index?
  if [ "$REGISTRY" = unknown ]; then
    local probe; probe=$(mktemp -d)
    timeout 15 "$PY" -m pip download -q --no-deps --timeout 5 --retries 0 -d "$probe" six >/dev/null 2>&1 \
      && REGISTRY=yes || REGISTRY=no
    rm -rf "$probe"
  fi
  [ "$REGISTRY" = yes ]
}

log "gpu_check: output in $DIR, python $PY, limits setup $LIMIT_SETUP parity $LIMIT_PARITY model $LIMIT_MODEL train $LIMIT_TRAIN s"
if [ "$DRY" = 1 ]; then
  note "dry run: nothing installed, no registry asked"
elif ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >>"$LOG" 2>&1; then
  note "no NVIDIA GPU visible (nvidia-smi missing or failing): nothing installed"
else
  WHEELS=${GPU_WHEELS:-}
  if [ -z "$WHEELS" ]; then
    for candidate in .whl shared/device-wheels; do
      compgen -G "$candidate/*.whl" >/dev/null && WHEELS=$candidate && break
    done
  fi
  if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    # all at once; if one does not fit this python (its tag), one by one so the others still go in
    if pip_in --no-index --no-deps "$WHEELS"/*.whl; then
      note "installed from $WHEELS: $(for w in "$WHEELS"/*.whl; do printf '%s ' "${w##*/}"; done)"
    else
      for w in "$WHEELS"/*.whl; do
        if pip_in --no-index --no-deps "$w"; then note "installed $w"; else note "could not install $w (see log)"; fi
      done
    fi
  fi
  if ! timeout 60 "$PY" -c 'import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)' >>"$LOG" 2>&1; then
    if registry_ok; then
      note "torch missing or without CUDA: installing torch from PyPI (a multi-GB download) within $(left) s"
      if pip_in torch; then note "torch installed"; else note "torch install failed or ran out of time"; fi
    else
      note "torch missing or without CUDA, and no package registry reachable"
    fi
  fi
  if ! why=$(kernels_ok); then
    note "kernels unavailable before any build: $why"
    if registry_ok; then
      # PyPI has only sdists for both: they build with nvcc against the torch here. FORCE_BUILD skips their
      # setup.py's download of a prebuilt wheel from GitHub (unreachable from a registry-only network).
      note "building causal-conv1d and mamba-ssm from PyPI sdists within $(left) s (a full build takes far longer)"
      if CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=$(nproc) \
           pip_in --no-build-isolation --no-deps causal-conv1d mamba-ssm; then
        note "built from sdists"
      else
        note "sdist build failed or ran out of time: the pure path is measured"
      fi
    else
      note "no package registry reachable: the pure path is measured (bring wheels in GPU_WHEELS)"
    fi
  fi
  if ! timeout 30 "$PY" -c 'import pydantic' >/dev/null 2>&1; then
    if registry_ok && pip_in pydantic; then note "pydantic installed from PyPI"
    else note "pydantic unavailable: gpu_train.py leaves out the memory-plan comparison"; fi
  fi
fi
INSTALL_S=$((SECONDS - SETUP_START))
report_limit=$(left); [ "$report_limit" -ge 20 ] || report_limit=20
SETUP_NOTES="$SETUP_NOTES" INSTALL_S="$INSTALL_S" timeout "$report_limit" "$PY" - "$DIR/setup.json" <<'EOF' 2>>"$LOG" \
  || printf '{"step": "setup", "stub": true, "error": "the setup report did not run (%s)"}\n' "$PY" >"$DIR/setup.json"
import json, os, platform, subprocess, sys
from importlib import metadata

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

report = {"step": "setup", "install_seconds": int(os.environ["INSTALL_S"]), "python": sys.executable,
          "python_version": platform.python_version(),
          "packages": {n: version(n) for n in ("torch", "mamba-ssm", "causal-conv1d", "triton", "pydantic", "pyyaml")},
          "actions": open(os.environ["SETUP_NOTES"]).read().splitlines()}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    report["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
except (OSError, subprocess.TimeoutExpired) as exc:
    report["nvidia_smi"] = f"unavailable: {exc}"
sys.path.insert(0, "bench")
try:
    from gpu_common import environment
    report.update(environment())
except Exception as exc:  # torch missing or broken: every later step will say the same
    report["error"] = f"{type(exc).__name__}: {exc}"
open(sys.argv[1], "w").write(json.dumps(report, indent=2) + "\n")
EOF
rm -f "$SETUP_NOTES"
SETUP_S=$((SECONDS - SETUP_START))

# ------------------------------------------------------------------------------------------------ steps
declare -A RC SECS
run_step() {  # NAME LIMIT SCRIPT [ARGS...]: the script writes DIR/NAME.json; a stand-in if it could not
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  rm -f "$DIR/$name.json"
  log "$name: $PY $* ${REQUIRE[*]+${REQUIRE[*]}} (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$PY" "$@" ${REQUIRE[@]+"${REQUIRE[@]}"} --json "$DIR/$name.json" >>"$LOG" 2>&1
  rc=$?
  RC[$name]=$rc SECS[$name]=$((SECONDS - start))
  log "$name: exit $rc after ${SECS[$name]}s"
  if [ ! -s "$DIR/$name.json" ]; then
    local why="exited $rc without a report (see gpu_check.log)"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why="timed out after ${limit}s"
    printf '{"script": "%s", "stub": true, "error": "%s"}\n' "$name" "$why" >"$DIR/$name.json"
  fi
}
run_step parity "$LIMIT_PARITY" bench/gpu_parity.py
run_step model "$LIMIT_MODEL" bench/gpu_model.py --seq 4096 --layers 8 --experts 16 --steps 3
run_step train "$LIMIT_TRAIN" bench/gpu_train.py --seq 4096 --micro-batch 1 --steps 3

# ------------------------------------------------------------------------------------------------ summary
STEP_RC="parity=${RC[parity]} model=${RC[model]} train=${RC[train]}" \
STEP_S="setup=$SETUP_S parity=${SECS[parity]} model=${SECS[model]} train=${SECS[train]}" \
timeout 20 "$PY" - "$DIR" <<'EOF' 2>>"$LOG"
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
rc = {k: int(v) for k, v in (kv.split("=") for kv in os.environ["STEP_RC"].split())}
secs = {k: int(v) for k, v in (kv.split("=") for kv in os.environ["STEP_S"].split())}
docs = {}
for name in ("setup", "parity", "model", "train"):
    try:
        docs[name] = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError) as exc:
        docs[name] = {"stub": True, "error": f"unreadable report: {exc}"}
setup, parity, model, train = (docs[k] for k in ("setup", "parity", "model", "train"))
checks = [{k: c.get(k) for k in ("check", "dtype", "max_rel_err", "tolerance", "passed", "error") if k in c}
          for c in parity.get("checks", [])]
crashed = [k for k in rc if rc[k] not in (0, 1, 2, 3) or docs[k].get("stub")]
if rc["parity"] == 1 and not parity.get("stub") and checks:
    status, code = "parity check failed: " + ", ".join(parity.get("failed", [])), 1
elif all(rc[k] == 3 for k in rc):
    status, code = "no CUDA device: nothing measured", 3
elif crashed:
    status, code = "step crashed or timed out: " + ", ".join(f"{k} ({docs[k].get('error')})" for k in crashed), 4
elif not parity.get("kernels_available", setup.get("kernels_available", False)):
    reason = parity.get("kernels_reason") or setup.get("kernels_reason")
    status, code = f"kernels unavailable, pure path measured, parity not run: {reason}", 2
else:
    status, code = "ok: kernels present, every parity check passed", 0
summary = {
    "status": status, "exit": code,
    "device": setup.get("device"), "torch": setup.get("torch"),
    "kernels_available": setup.get("kernels_available"), "kernels_reason": setup.get("kernels_reason"),
    "setup_actions": setup.get("actions"),
    "steps": {k: {"exit": rc.get(k, 0), "seconds": secs.get(k), "error": docs[k].get("error")} for k in docs},
    "parity": checks,
    "model_speed": model.get("speed"), "kernel_speedup": model.get("kernel_speedup"),
    "train": {k: train.get(k) for k in ("tokens_per_s", "mfu", "step_s_median", "peak_memory_gib",
                                        "activation_memory_measured_gib", "activation_memory_planned_gib")},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
raise SystemExit(code)
EOF
code=$?
[ "$code" -le 4 ] || code=4   # the summary itself failed (timeout, no python): say "crashed"
log "gpu_check: exit $code (summary: $DIR/summary.json, log: $LOG)"
exit "$code"
