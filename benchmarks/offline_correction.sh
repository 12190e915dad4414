#!/usr/bin/env bash
# One seed of docs/results.md sections 6-8 (mul, the head-to-head's settings):
#   bash benchmarks/offline_correction.sh SEED
# 1. configs/offline-correction.toml: the shared rollout, base, RFT, DRIFT, pruned DRIFT, DRIFT without
#    never-solved groups, and that arm with correction contexts (8 and 16 continuations per planted
#    answer); held-out succ@k under oracle feedback.
# 2. the planted probe on the held-out facts: the base model's own most frequent wrong first answer
#    (sampled once into runs/oc-planted, shared by every seed and arm), then every arm's turn 2 and 3.
# 3. the same DRIFT arm and base model under the hint environment ("too high" / "too low").
set -euo pipefail
S=$1
DRIFT=${DRIFT:-.venv/bin/drift}
OUT=runs/oc-s$S
$DRIFT run configs/offline-correction.toml --set output=$OUT --set rollout.seed=$S --set train.seed=$S
E="$DRIFT eval --tasks mul --split test --max-new-tokens 48 --batch-size 32 --protocol planted --max-turns 3"
[ -f runs/oc-planted/metrics.json ] || $E --model smollm2-135m --output runs/oc-planted
for arm in rft drift drift-pruned drift-du drift-du-planted drift-du-planted16; do
  [ -f $OUT/probe/$arm/metrics.json ] || $E --model $OUT/train/$arm --planted runs/oc-planted --output $OUT/probe/$arm
done
$DRIFT run configs/offline-correction.toml --set output=runs/hint-s$S --set rollout.seed=$S --set train.seed=$S \
  --set rollout.env=hint --arms '{"drift": {"method": "drift"}}'
