#!/usr/bin/env bash
# The GPU measurements of the performance section, stage by stage, for a lent H100/H200.
# Each stage fits one device call (10 minutes); results go to $OUT/<stage>.jsonl, logs to
# $OUT/<stage>.log. The machine has torch but no Ray: build the wheels here first
# (../shared/tools/device-wheels.sh writes .whl/), prepare Beauty (.data/beauty), and carry both:
#   run(command="bash jobs/bench_gpu.sh train quality", carry=[".whl", ".data/beauty"])
# Stages:
#   train    flm bench train on Beauty (batch 256): SASRec and joint, windows all and prefixes,
#            eager and torch.compile
#   quality  flm bench quality: Beauty SASRec pretraining (jobs/data/beauty.yaml +
#            jobs/recipes/sasrec.yaml), bf16 then fp32 (same seed), until validation NDCG@10
#            0.0517 (history not masked): time to it, epochs, throughput, test metrics
#   attributes  flm bench quality of the attributes presets' recipe (jobs/recipes/sasrec.yaml +
#            jobs/recipes/item_features.yaml, width 64, bf16), then of the fast recipe (plus
#            jobs/recipes/fast.yaml), on Beauty, Toys and Sports until RecBole's validation
#            (0.0517, 0.0511, 0.0287); data from $BEAUTY_ATTRIBUTES,
#            $TOYS_ATTRIBUTES, $SPORTS_ATTRIBUTES (default .data/<set>_attributes; a set whose
#            data is missing is skipped), e.g. carry=[".whl", ".data/toys_attributes", ...]
#   topk     flm bench topk on the GPU at 1M and 10M items
#   large    a 1M-item synthetic log (needs Ray from .whl), then the large configuration
#            (hidden 512, 4 layers, max_len 200, batch 1024, sampled softmax) for MFU
# With BENCH_SMOKE=1 every stage runs a few steps on whatever device there is (used on CPU to
# check this script).
set -euo pipefail
OUT=${OUT:-/tmp/bench_gpu}
mkdir -p "$OUT"
scratch=$(mktemp -d)  # runs and synthetic data; only the JSON lines and logs go to $OUT
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
flm() { python3 -m flm_dist.cli "$@"; }
smoke=${BENCH_SMOKE:-0}
steps=100; warmup=20; quality_target=valid/ndcg@10/full_nomask=0.0517; topk_items=(1000000 10000000); large_rows=20000000
large_model=(model.hidden=512 model.layers=4 model.heads=8 model.max_len=200 train.batch_size=1024)
if [ "$smoke" = 1 ]; then
  steps=3; warmup=1; epochs=2; quality_target=valid/ndcg@10/full_nomask=1.0; topk_items=(20000); large_rows=20000
  large_model=(model.hidden=32 model.layers=1 model.heads=2 model.max_len=20 train.batch_size=16)
fi
data=${BEAUTY:-.data/beauty}
sasrec=(loss.cf=0 loss.fused=0 loss.flow=0)
json_lines() { grep '^{' "$1" >>"$2" || true; }

stage_train() {
  local log=$OUT/train.log result=$OUT/train.jsonl
  for model in sasrec joint; do
    for windows in all prefixes; do
      for compile in false true; do
        local extra=()
        [ "$model" = sasrec ] && extra=("${sasrec[@]}")
        echo "== $model windows=$windows compile=$compile" >>"$log"
        flm bench train --data "$data" --output "$scratch/bench_train" --steps "$steps" --warmup "$warmup" \
          train.batch_size=256 train.windows="$windows" train.compile="$compile" model.positions=first \
          "${extra[@]}" >>"$log" 2>&1
        tail -n 1 "$log" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); \
r.update(model='$model', windows='$windows'); print(json.dumps(r))" >>"$result"
      done
    done
  done
}

stage_quality() {
  local schedule=()  # the recipe's 20 epochs, whose cosine the target falls inside
  [ "$smoke" = 1 ] && schedule=(train.epochs="$epochs")
  for precision in bf16 fp32; do
    # the SASRec preset of jobs/sasrec_beauty.yaml, stopped at the target (flm bench quality)
    flm bench quality --config jobs/data/beauty.yaml --config jobs/recipes/sasrec.yaml \
      --data "$data" --output "$scratch/runs/beauty_$precision" --target "$quality_target" \
      scaling.workers=0 "${schedule[@]}" train.precision="$precision" 2>>"$OUT/quality.log" \
      | tee -a "$OUT/quality.log" | grep '^{' >>"$OUT/quality.jsonl" || true
  done
}

stage_attributes() {
  local set dir target recipe schedule=()  # the recipe's 20 epochs, whose cosine the target falls inside
  [ "$smoke" = 1 ] && schedule=(train.epochs="$epochs")
  for set in beauty:0.0517 toys:0.0511 sports:0.0287; do
    target=${set#*:}; set=${set%%:*}
    dir=$(eval echo "\${${set^^}_ATTRIBUTES:-.data/${set}_attributes}")
    [ "$smoke" = 1 ] && target=1.0
    if [ ! -d "$dir" ]; then echo "skipped $set: no $dir" >>"$OUT/attributes.log"; continue; fi
    for recipe in attributes fast; do
      local extra=()
      [ "$recipe" = fast ] && extra=(--config jobs/recipes/fast.yaml)
      flm bench quality --config "jobs/data/${set}_attributes.yaml" --config jobs/recipes/sasrec.yaml \
        --config jobs/recipes/item_features.yaml "${extra[@]}" --data "$dir" \
        --output "$scratch/runs/${set}_$recipe" --target "valid/ndcg@10/full_nomask=$target" scaling.workers=0 \
        "${schedule[@]}" 2>>"$OUT/attributes.log" | tee -a "$OUT/attributes.log" \
        | SET=$set RECIPE=$recipe python3 -c "import json,os,sys; [print(json.dumps({**json.loads(l), 'set': os.environ['SET'], 'recipe': os.environ['RECIPE']})) for l in sys.stdin if l.startswith('{')]" \
        >>"$OUT/attributes.jsonl" || true
    done
  done
}

stage_topk() {
  for items in "${topk_items[@]}"; do
    flm bench topk --items "$items" --users 22363 --dim 64 --device "$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')" \
      2>>"$OUT/topk.log" | tee -a "$OUT/topk.log" | grep '^{' >>"$OUT/topk.jsonl" || true
  done
}

stage_large() {
  local synth=$scratch/large/synth prepared=$scratch/large/prepared log=$OUT/large.log
  local items=$((large_rows / 20))
  flm synth --users $((large_rows / 100)) --items "$items" --interactions "$large_rows" --output "$synth" \
    zipf=0.3 workers=8 >>"$log" 2>&1
  flm prepare --input "$synth" --format parquet --output "$prepared" min_user_interactions=0 \
    min_item_interactions=0 >>"$log" 2>&1
  # torch.compile cannot take sparse table gradients: eager with sparse tables, compiled with dense.
  for compile in false true; do
    local sparse=true
    [ "$compile" = true ] && sparse=false
    flm bench train --data "$prepared" --output "$scratch/bench_large" --steps "$steps" --warmup "$warmup" \
      "${large_model[@]}" loss.softmax=sampled loss.negative_sampling=popularity loss.num_negatives=8192 \
      loss.max_in_batch_negatives=8192 train.sparse_item_table="$sparse" train.compile="$compile" \
      "${sasrec[@]}" >>"$log" 2>&1
    json_lines <(tail -n 1 "$log") "$OUT/large.jsonl"
  done
}

[ $# -gt 0 ] || { echo "usage: $0 train|quality|attributes|topk|large ..." >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/device.txt" 2>/dev/null || echo cpu >"$OUT/device.txt"
for stage in "$@"; do
  start=$(date +%s)
  "stage_$stage"
  echo "$stage: $(($(date +%s) - start)) s" >>"$OUT/stages.txt"
done
