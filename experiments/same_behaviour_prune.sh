#!/bin/bash
# Same behaviour across a refactor: one SparseGPT prune of SmolLM2 at 50%, perplexity on the first 4
# WikiText-2 test windows, with the code of two checkouts (default: /work/main before, this one
# after); the two JSON reports must agree in everything but the timings.
# Usage, from the repository root (AUTOPRUNE: the console script of the venv, which honours
# PYTHONPATH): AUTOPRUNE=/work/main/.venv/bin/autoprune bash experiments/same_behaviour_prune.sh [BEFORE] [AFTER]
set -e
before=${1:-/work/main}
after=${2:-$PWD}
results=$PWD/experiments/results/same_behaviour_prune
work=$(mktemp -d)
for side in before after; do
  code=$([ $side = before ] && echo "$before" || echo "$after")
  (cd "$code" && PYTHONPATH="$code" nice -n 10 "${AUTOPRUNE:-autoprune}" prune --model smollm2-135m \
    --method sparsegpt --sparsity 0.5 --data ../shared/data/wikitext-2 --eval-windows 4 \
    --out "$work/$side" --format json > "$results/$side.json")
done
rm -rf "$work"
