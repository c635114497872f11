#!/usr/bin/env bash
# GPU check for issue 11, unattended, in at most GPU_CHECK_SECONDS (default 290 s) on one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh              # from a fresh clone: makes .venv-gpu, prints one table at the end
#   bash benchmarks/gpu_check.sh --dry-run    # the same python commands on a CPU with tiny settings, no install
#
# 1. set-up: a venv that sees the machine's own torch (--system-site-packages), hf_ddpm installed editable
#    into it; what `make install TORCH_SPEC=` does, without replacing the machine's CUDA build of torch;
# 2. benchmarks/train_throughput.py, ddpm-cifar10-32 at batch 128: fp32 (TF32 off), TF32, bf16, each eager and
#    compiled: img/s, steps/s, ratio to diffusers' loop, peak memory (the compiled ones last: they take longest);
# 3. a 300-step digits-16 run with a checkpoint at 150, and a second run resumed from that checkpoint: how far
#    its final weights are from the straight run's (cuDNN's kernels may not be bit-reproducible);
# 4. benchmarks/sample_throughput.py on that model: DDPM and DPM-Solver++ against plain diffusers.
# Every step runs under `timeout` with what is left of the budget; a step that would start with under 20 s left
# is skipped and says so in the table, so a hang never eats the GPU's time.
set -uo pipefail

cd "$(dirname "$0")/.."
BUDGET=${GPU_CHECK_SECONDS:-290}
START=$SECONDS
WORK=$(mktemp -d -t gpu_check-XXXX)
LOG="$WORK/log.txt"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1

if ((DRY)); then
    PY=${PYTHON:-python}
    PRESET=tiny-8 BATCH=8 STEPS=2 ROUNDS=1 PROFILE=2 TRAIN_STEPS=6 HALF=3 SAMPLE_IMAGES=4 DDPM_STEPS=4
else
    PY=.venv-gpu/bin/python
    PRESET=ddpm-cifar10-32 BATCH=128 STEPS=30 ROUNDS=3 PROFILE=10 TRAIN_STEPS=300 HALF=150 SAMPLE_IMAGES=256
    DDPM_STEPS=100
fi

# step NAME LIMIT CMD...: run CMD under timeout (LIMIT seconds, or what is left of the budget), output to the log
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "skipped (out of time)" >"$WORK/$name.status"
        return 1
    fi
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    if timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1; then
        echo "ok" >"$WORK/$name.status"
    else
        local rc=$?
        echo "failed (exit $rc$( ((rc == 124)) && echo ', timed out'))" >"$WORK/$name.status"
        tail -n 5 "$LOG"
        return 1
    fi
}

if ((!DRY)); then
    if [[ ! -x $PY ]]; then
        python3 -m venv --system-site-packages .venv-gpu
    fi
    step setup 150 .venv-gpu/bin/pip install --quiet -e . || { tail -n 20 "$LOG"; exit 1; }
fi
step device 30 "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
THROUGHPUT=(benchmarks/train_throughput.py --preset "$PRESET" --batch_size "$BATCH" --steps "$STEPS"
            --rounds "$ROUNDS" --profile_steps "$PROFILE")
# throughput [--torch_compile]: the three precisions, eager or compiled (compiling takes a minute or more)
throughput() {
    local precision name flags
    for precision in fp32 tf32 bf16; do
        case $precision in
            fp32) flags=(--no_tf32) ;;
            tf32) flags=() ;;
            bf16) flags=(--mixed_precision bf16) ;;
        esac
        name="train-$precision${1:+-compiled}"
        step "$name" "$([[ -n ${1:-} ]] && echo 100 || echo 60)" \
            "$PY" "${THROUGHPUT[@]}" "${flags[@]}" "$@" --json "$WORK/$name.json"
    done
}
throughput

TRAIN=(scripts/train.py --preset digits-16 --max_train_steps "$TRAIN_STEPS" --checkpointing_steps "$HALF"
       --report_to none --sample_every 0 --num_final_images 16)
step train-straight 60 "$PY" "${TRAIN[@]}" --output_dir "$WORK/straight"
step train-resumed 60 "$PY" "${TRAIN[@]}" --output_dir "$WORK/resumed" \
    --resume_from_checkpoint "$WORK/straight/checkpoints/checkpoint-$HALF"
step resume-compare 20 "$PY" - "$WORK" "$TRAIN_STEPS" <<'EOF'
import json, sys
from safetensors.torch import load_file
work, steps = sys.argv[1], sys.argv[2]
a, b = (load_file(f"{work}/{run}/checkpoints/checkpoint-{steps}/model.safetensors") for run in ("straight", "resumed"))
diff = max((a[k] - b[k]).abs().max().item() for k in a)
json.dump({"max_abs_diff": diff}, open(f"{work}/resume.json", "w"))
EOF

for sampler in ddpm dpmsolver++; do
    steps=$([[ $sampler == ddpm ]] && echo "$DDPM_STEPS" || echo 20)
    step "sample-$sampler" 60 "$PY" benchmarks/sample_throughput.py "$WORK/straight" --sampler "$sampler" \
        --num_inference_steps "$steps" --num_images "$SAMPLE_IMAGES" --batch_size "$SAMPLE_IMAGES" --rounds 2 \
        --variants eager,compiled,half --json "$WORK/sample-$sampler.json"
done
throughput --torch_compile  # last: if compiling is slow, only these rows go missing

"$PY" - "$WORK" "$PRESET" "$BATCH" <<'EOF'
import json, sys
from pathlib import Path
work, preset, batch = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
status = lambda name: (work / f"{name}.status").read_text().strip() if (work / f"{name}.status").exists() else "not run"
load = lambda name: json.loads((work / f"{name}.json").read_text()) if (work / f"{name}.json").exists() else None
print(f"\n| check ({preset}, batch {batch}) | img/s | steps/s | vs diffusers' loop | peak MiB | status |")
print("|---|---:|---:|---:|---:|---|")
for compiled in ("", "-compiled"):
    for precision in ("fp32", "tf32", "bf16"):
        name = f"train-{precision}{compiled}"
        r = load(name)
        if r:
            s = r["hf_ddpm"]
            memory = f"{s['peak_memory_mib']:.0f}" if s["peak_memory_mib"] is not None else "-"
            # a compile that failed or was caught computing wrong gradients runs eager (speed.compile_unet)
            fell_back = compiled and not r["speed_settings"].startswith("compiled")
            print(f"| train {precision}{' compiled' if compiled else ''} | {s['median']:.0f} | {s['steps_per_s']:.1f} | "
                  f"{r['ratio']['median']:.2f}x | {memory} | {status(name)}{', ran eager' if fell_back else ''} |")
        else:
            print(f"| train {precision}{' compiled' if compiled else ''} | | | | | {status(name)} |")
resume = load("resume")
print(f"| resume: largest weight difference, straight vs resumed | {resume['max_abs_diff']:.3g} | | | | {status('resume-compare')} |"
      if resume else f"| resume | | | | | {status('train-resumed')} |")
for sampler in ("ddpm", "dpmsolver++"):
    r = load(f"sample-{sampler}")
    for side, s in (r["sides"].items() if r else []):
        print(f"| sample {sampler} {r['steps']} steps: {side} | {s['evals_per_s']:.0f} evals/s | | {s['vs_plain']:.2f}x "
              f"plain | | mean diff {s['mean_abs_diff']:.2f} |")
    if not r:
        print(f"| sample {sampler} | | | | | {status('sample-' + sampler)} |")
print(f"\nlog: {work / 'log.txt'}")
EOF
echo "total ${SECONDS}s (budget ${BUDGET}s)"
