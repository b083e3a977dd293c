#!/bin/bash
# The general adapter's recipe for the embedded model, end to end, each stage timed:
#   scripts/general-recipe.sh RUN_DIR ADAPTER_DIR
# compose requests from human-written templates -> answer each greedily and once sampled (self-distillation,
# in-process, 128 at a time, loops stopped) -> cut loops -> hidden states + 2 epochs of heads -> tune the tree.
# Stage times go to RUN_DIR/times. Run from the repository root with the project's venv active.
set -euo pipefail
RUN=${1:?run directory}; OUT=${2:?adapter directory}
mkdir -p "$RUN"
T=$RUN/times
stage() { echo "$1 $(( $(date +%s) - t )) s" >> "$T"; t=$(date +%s); }
t0=$(date +%s); t=$t0; echo "start $(date -u)" > "$T"
python -m gorgon.training.compose "$RUN/prompts.json" --n 2500 --seed 0 \
  --exclude data/distill/composed-tune-prompts.json > "$RUN/compose.log" 2>&1
stage compose
DISTILL=(--input-filename "$RUN/prompts.json" --concurrency 128 --max-tokens 384 --seed 0
  --max-batch-total-tokens 65536 --stop-loops)
gorgon distill "${DISTILL[@]}" --output-filename "$RUN/greedy.json" --temperature 0 > "$RUN/greedy.log" 2>&1
stage "distill greedy"
gorgon distill "${DISTILL[@]}" --output-filename "$RUN/sampled.json" --temperature 0.7 > "$RUN/sampled.log" 2>&1
stage "distill sampled"
for part in greedy sampled; do
  python -m gorgon.training.prepare "$RUN/$part.json.done.jsonl" "$RUN/$part-train.json" \
    --exclude data/distill/composed-tune-prompts.json >> "$RUN/prepare.log" 2>&1
done
stage prepare
gorgon train --model_name_or_path embedded --data_path "$RUN/greedy-train.json,$RUN/sampled-train.json" \
  --bf16 True --output_dir "$OUT" --num_train_epochs 2 --per_device_train_batch_size 8 --learning_rate 1e-3 \
  --warmup_ratio 0.05 --lr_scheduler_type cosine --evaluation_strategy epoch --save_strategy no \
  --model_max_length 1024 --medusa_num_heads 3 --medusa_num_layers 1 --medusa_train_vocab ngrams \
  --features_cache_dir "$RUN/features" > "$RUN/train.log" 2>&1
stage train
gorgon tune-tree --adapter-id "$OUT" --adapter-source local --prompts-file data/distill/composed-tune-prompts.json \
  --prompts 24 --max-new-tokens 128 --max-nodes 8 --top-k 4 --output "$OUT/gorgon_tree.json" > "$RUN/tune.log" 2>&1
stage tune-tree
echo "total $(( $(date +%s) - t0 )) s; end $(date -u)" >> "$T"
