#!/usr/bin/env bash
# The main job: LoRA fine-tune of SmolLM2-135M-Instruct on GSM8K on this CPU, showing the
# answer to a held-out test question before and after, and the held-out eval loss at step 0 and at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

CONFIG=examples/smollm2-135m/lora-gsm8k.yml
OUT=${OUT:-outputs/smollm2-lora-gsm8k}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-160}  # the answer length shown before and after
question=$(python -c 'import json; print(json.loads(open("data/gsm8k/test.jsonl").readline())["question"])')
reference=$(python -c 'import json; print(json.loads(open("data/gsm8k/test.jsonl").readline())["answer"])')

echo "== Held-out question (GSM8K test set) =="
echo "$question"
echo
echo "== Before fine-tuning =="
lmforge inference "$CONFIG" --prompt "$question" --max_new_tokens "$MAX_NEW_TOKENS"
echo
echo "== Fine-tuning (LoRA) =="
lmforge train "$CONFIG" --output_dir="$OUT" "$@"
echo
echo "== After fine-tuning =="
lmforge inference "$CONFIG" --lora_model_dir "$OUT" --prompt "$question" --max_new_tokens "$MAX_NEW_TOKENS"
echo
echo "== Reference answer =="
echo "$reference"
python - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
start, end = s["eval_loss_start"], s["eval_loss_end"]
print(f"\nheld-out eval loss: {start:.4f} at step 0 -> {end:.4f} after {s['steps']} steps ({1 - end / start:.1%} lower)")
PY
