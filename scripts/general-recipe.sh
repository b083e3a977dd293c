#!/bin/bash
# The general adapter's recipe for the embedded model, end to end, each stage timed:
#   scripts/general-recipe.sh RUN_DIR ADAPTER_DIR
# compose 5000 requests from human-written templates (2500 of the `general` family, 2500 of `everyday`)
# -> answer each greedily (self-distillation, in-process, 128 at a time, loops stopped) -> cut loops ->
# hidden states + 3 epochs of heads (best validation epoch kept) -> tune the tree.
# Greedy answers only: session 7's run added a sampled (temperature 0.7) answer to each request and its heads
# were worse (1.58 tokens per step against 1.70), as Magpie's odd requests were in session 6.
# Stage times go to RUN_DIR/times. Run from the repository root with the project's venv active.
set -euo pipefail
RUN=${1:?run directory}; OUT=${2:?adapter directory}
N=${N:-2500}  # requests per family
mkdir -p "$RUN"
T=$RUN/times
TUNE=data/distill/composed-tune-prompts.json
stage() { echo "$1 $(( $(date +%s) - t )) s" >> "$T"; t=$(date +%s); }
t0=$(date +%s); t=$t0; echo "start $(date -u)" > "$T"
for family in general everyday; do
  python -m gorgon.training.compose "$RUN/$family-prompts.json" --family $family --n "$N" --seed 0 \
    --exclude $TUNE >> "$RUN/compose.log" 2>&1
done
python - "$RUN" <<'PY' >> "$RUN/compose.log"
import json, sys
run = sys.argv[1]
convs = [c for f in ("general", "everyday") for c in json.load(open(f"{run}/{f}-prompts.json"))]
json.dump(convs, open(f"{run}/prompts.json", "w"), ensure_ascii=False, indent=1)
print(f"{len(convs)} requests in {run}/prompts.json")
PY
stage compose
gorgon distill --input-filename "$RUN/prompts.json" --output-filename "$RUN/greedy.json" --temperature 0 \
  --concurrency 128 --max-tokens 384 --seed 0 --max-batch-total-tokens 65536 --stop-loops > "$RUN/greedy.log" 2>&1
stage "distill greedy"
python -m gorgon.training.prepare "$RUN/greedy.json.done.jsonl" "$RUN/greedy-train.json" \
  --exclude $TUNE > "$RUN/prepare.log" 2>&1
stage prepare
gorgon train --model_name_or_path embedded --data_path "$RUN/greedy-train.json" \
  --bf16 True --output_dir "$OUT" --num_train_epochs 3 --per_device_train_batch_size 8 --learning_rate 1e-3 \
  --warmup_ratio 0.05 --lr_scheduler_type cosine --evaluation_strategy epoch --save_strategy no \
  --model_max_length 1024 --medusa_num_heads 3 --medusa_num_layers 1 --medusa_train_vocab ngrams \
  --features_cache_dir "$RUN/features" > "$RUN/train.log" 2>&1
stage train
gorgon tune-tree --adapter-id "$OUT" --adapter-source local --prompts-file $TUNE \
  --prompts 24 --max-new-tokens 128 --max-nodes 8 --top-k 4 --output "$OUT/gorgon_tree.json" > "$RUN/tune.log" 2>&1
stage tune-tree
echo "total $(( $(date +%s) - t0 )) s; end $(date -u)" >> "$T"
