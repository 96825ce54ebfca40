#!/usr/bin/env bash
# The GPU measurements of the performance section, stage by stage, for a lent H100/H200.
# Each stage fits one device call (10 minutes); results go to $OUT/<stage>.jsonl, logs to
# $OUT/<stage>.log. The machine has torch but neither Ray, RecBole nor tensorboardX (which flm's
# training logs need): carry their wheels in .whl/ (docs/benchmarks.md "On an H200" downloads
# them). A failing flm run stops the script (set -e); RecBole's failures do not.
# Stages:
#   presets  the Toys, Beauty and Sports attributes presets (jobs/sasrec_attributes_<set>.yaml) until
#            RecBole's best validation NDCG@10 (0.0511, 0.0517, 0.0287, history not masked), each
#            followed by one epoch of RecBole 1.2.1's SASRec on the same set when the peer is
#            carried: copy ../shared/peers/*.py, *.yaml and ../shared/data/<DATASET>.txt to .peer/
#            (.peer/data/) and RecBole's wheels (recbole==1.2.1 colorlog==4.7.2 texttable==1.7.2)
#            to .whl/ beside tensorboardX's; data from $TOYS_ATTRIBUTES, $BEAUTY_ATTRIBUTES, $SPORTS_ATTRIBUTES (default
#            .data/<set>_attributes; a set whose data is missing is skipped):
#              run(command="bash jobs/bench_gpu.sh presets train", carry=[".whl", ".peer",
#                  ".data/toys_attributes", ".data/beauty_attributes", ".data/sports_attributes"])
#   variants the Toys preset until RecBole's validation with jobs/recipes/large_batch.yaml, with
#            train.cudnn_attention=true, and with train.compile=true (each alone)
#   train    flm bench train on the Toys preset (width 128, batch 256) and on a wide model over the
#            same data (hidden 512, 4 layers, batch 1024), eager and torch.compile; the preset's
#            eager row holds a profile of its step
#   quality  flm bench quality: Beauty SASRec pretraining (jobs/data/beauty.yaml +
#            jobs/recipes/sasrec.yaml, data .data/beauty), bf16 then fp32 (same seed), until
#            validation NDCG@10 0.0517 (history not masked)
#   topk     flm bench topk on the GPU at 1M and 10M items
#   large    a 1M-item synthetic log (needs Ray: ../shared/tools/device-wheels.sh writes its wheels
#            to .whl/), then the large configuration (hidden 512, 4 layers, max_len 200, batch 1024,
#            sampled softmax) for MFU
# With BENCH_SMOKE=1 every stage runs a few steps on whatever device there is (used on CPU to
# check this script).
set -euo pipefail
OUT=${OUT:-/tmp/bench_gpu}
mkdir -p "$OUT"
scratch=$(mktemp -d)  # runs and synthetic data; only the JSON lines and logs go to $OUT
if [ -d .whl ] && ! python3 -c "import ray" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
flm() { python3 -m flm_dist.cli "$@"; }
smoke=${BENCH_SMOKE:-0}
device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
PEER=${PEER:-.peer}; peer_python=${PEER_PYTHON:-python3}  # RecBole may live in its own virtualenv
steps=100; warmup=20; budget_minutes=4; peer_epochs=1; peer_budget=240; schedule=(); quality_target=valid/ndcg@10/full_nomask=0.0517; topk_items=(1000000 10000000); large_rows=20000000
large_model=(model.hidden=512 model.layers=4 model.heads=8 model.max_len=200 train.batch_size=1024)
if [ "$smoke" = 1 ]; then
  steps=3; warmup=1; schedule=(train.epochs=2); peer_budget=60; quality_target=valid/ndcg@10/full_nomask=1.0; topk_items=(20000); large_rows=20000
  large_model=(model.hidden=32 model.layers=1 model.heads=2 model.max_len=20 train.batch_size=16)
fi
data=${BEAUTY:-.data/beauty}
sasrec=(loss.cf=0 loss.fused=0 loss.flow=0)
json_lines() { grep '^{' "$1" >>"$2" || true; }
# stdin's JSON lines (the others dropped), each with KEY set to VALUE: which run printed it.
tag_json() { KEY=$1 VALUE=$2 python3 -c "import json,os,sys; [print(json.dumps({**json.loads(l), \
os.environ['KEY']: os.environ['VALUE']})) for l in sys.stdin if l.startswith('{')]"; }
attributes_recipe=(--config jobs/recipes/sasrec.yaml --config jobs/recipes/item_features.yaml)

stage_train() {
  # The Toys attributes preset's step (width 128, batch 256, full softmax), then a wide model on the
  # same data for the fraction of the matmul peak (hidden 512, 4 layers, batch 1024); eager, compiled.
  # The preset's eager run then profiles 10 steps: its row holds the top operators on the device.
  local log=$OUT/train.log result=$OUT/train.jsonl dir=${TOYS_ATTRIBUTES:-.data/toys_attributes} shape compile
  local preset=(model.hidden=128) wide=(model.hidden=512 model.layers=4 model.heads=8 train.batch_size=1024)
  [ "$smoke" = 1 ] && wide=(model.hidden=32 model.layers=1 model.heads=2 train.batch_size=16)
  for shape in preset wide; do
    for compile in false true; do
      local extra=("${preset[@]}") profile=()
      [ "$shape" = wide ] && extra=("${wide[@]}")
      [ "$shape" = preset ] && [ "$compile" = false ] && profile=(--profile 10)
      echo "== $shape compile=$compile $(date -u +%H:%M:%S)" >>"$log"
      flm bench train --config jobs/data/toys_attributes.yaml "${attributes_recipe[@]}" --data "$dir" \
        --output "$scratch/bench_train" --steps "$steps" --warmup "$warmup" "${profile[@]}" \
        train.compile="$compile" "${extra[@]}" >>"$log" 2>&1
      tail -n 1 "$log" | tag_json shape "$shape" >>"$result"
    done
  done
}

stage_quality() {
  for precision in bf16 fp32; do
    # the SASRec preset of jobs/sasrec_beauty.yaml, stopped at the target (flm bench quality)
    flm bench quality --config jobs/data/beauty.yaml --config jobs/recipes/sasrec.yaml \
      --data "$data" --output "$scratch/runs/beauty_$precision" --target "$quality_target" \
      scaling.workers=0 "${schedule[@]}" train.precision="$precision" 2>>"$OUT/quality.log" \
      | tee -a "$OUT/quality.log" | grep '^{' >>"$OUT/quality.jsonl" || true
  done
}

stage_presets() {
  # The three attributes presets (jobs/sasrec_attributes_<set>.yaml: width 128 on Toys and Beauty,
  # 64 on Sports) until RecBole's best validation, each followed by one epoch of RecBole's SASRec on
  # the same set when the peer is carried ($PEER: run_recbole.py, recbole_sasrec.yaml, data/<DATASET>.txt,
  # with RecBole's wheels in .whl). RecBole's time to the target is estimated from that epoch.
  local entry set dataset target width dir
  for entry in toys:Toys_and_Games:0.0511:128 beauty:Beauty:0.0517:128 sports:Sports_and_Outdoors:0.0287:64; do
    IFS=: read -r set dataset target width <<<"$entry"
    dir=$(eval echo "\${${set^^}_ATTRIBUTES:-.data/${set}_attributes}")
    [ "$smoke" = 1 ] && target=1.0
    if [ ! -d "$dir" ]; then echo "skipped $set: no $dir" >>"$OUT/presets.log"; continue; fi
    echo "== flm $set $(date -u +%H:%M:%S)" >>"$OUT/presets.log"
    flm bench quality --config "jobs/data/${set}_attributes.yaml" "${attributes_recipe[@]}" --data "$dir" \
      --output "$scratch/runs/$set" --target "valid/ndcg@10/full_nomask=$target" \
      --budget-minutes "$budget_minutes" scaling.workers=0 model.hidden="$width" "${schedule[@]}" \
      2>>"$OUT/presets.log" | tee -a "$OUT/presets.log" | tag_json set "$set" >>"$OUT/presets.jsonl"
    if [ -f "$PEER/run_recbole.py" ]; then
      echo "== recbole $set $(date -u +%H:%M:%S)" >>"$OUT/presets.log"
      "$peer_python" "$PEER/run_recbole.py" "$dataset" "$peer_epochs" "$device" --data-dir "$PEER/data" \
        --workdir "$scratch/recbole_$set" --budget "$peer_budget" >"$scratch/recbole_$set.log" 2>&1 || true
      cat "$scratch/recbole_$set.log" >>"$OUT/presets.log"
      grep '^{"peer"' "$scratch/recbole_$set.log" | tag_json set "$set" >>"$OUT/presets.jsonl" || true
    fi
  done
}

stage_variants() {
  # The Toys preset to RecBole's validation with one change each: the opt-in large batch, cuDNN's
  # attention (the default before 2026-12-04), torch.compile over the whole run (skipped with
  # BENCH_SMOKE=1: compiling takes minutes on a CPU).
  local dir=${TOYS_ATTRIBUTES:-.data/toys_attributes} target=0.0511 name
  [ "$smoke" = 1 ] && target=1.0
  if [ ! -d "$dir" ]; then echo "skipped variants: no $dir" >>"$OUT/variants.log"; return; fi
  for name in large_batch cudnn_attention compile; do
    local configs=() overrides=()
    case $name in
      large_batch) configs=(--config jobs/recipes/large_batch.yaml) ;;
      cudnn_attention) overrides=(train.cudnn_attention=true) ;;
      compile) [ "$smoke" = 1 ] && continue; overrides=(train.compile=true) ;;
    esac
    echo "== $name $(date -u +%H:%M:%S)" >>"$OUT/variants.log"
    flm bench quality --config jobs/data/toys_attributes.yaml "${attributes_recipe[@]}" "${configs[@]}" \
      --data "$dir" --output "$scratch/variants/$name" --target "valid/ndcg@10/full_nomask=$target" \
      --budget-minutes "$budget_minutes" scaling.workers=0 model.hidden=128 "${overrides[@]}" "${schedule[@]}" \
      2>>"$OUT/variants.log" | tee -a "$OUT/variants.log" | tag_json variant "$name" >>"$OUT/variants.jsonl"
  done
}

stage_topk() {
  for items in "${topk_items[@]}"; do
    flm bench topk --items "$items" --users 22363 --dim 64 --device "$device" \
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

[ $# -gt 0 ] || { echo "usage: $0 presets|variants|train|quality|topk|large ..." >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/device.txt" 2>/dev/null || echo cpu >"$OUT/device.txt"
for stage in "$@"; do
  start=$(date +%s)
  "stage_$stage"
  echo "$stage: $(($(date +%s) - start)) s" >>"$OUT/stages.txt"
done
