#!/usr/bin/env bash
# The example in docs/guides/evaluate.md, end to end and offline: train a small MDM, a small GPT-2 baseline and a larger
# GPT-2 judge on the Shakespeare corpus (examples/shakespeare/prepare.py makes data/shakespeare), then run
# `hf-mdm evaluate`. Sized for a CPU: about 50 minutes on 2 busy cores, half of it ancestral sampling. On a GPU
# raise STEPS, LENGTH, the model sizes, NUM_SAMPLES and ANCESTRAL_STEPS, and set PRECISION=bf16.
#
#   bash examples/evaluation_example.sh            # writes runs/eval-example/eval/{results.json,results.md,plot.png}
set -euo pipefail

DATA=${DATA:-data/shakespeare}
RUNS=${RUNS:-runs/eval-example}
LENGTH=${LENGTH:-64}              # tokens per training block and per sample
STEPS=${STEPS:-300}               # optimizer steps of the MDM and the AR baseline
JUDGE_STEPS=${JUDGE_STEPS:-400}
BATCH=${BATCH:-16}                # sequences per optimizer step
PRECISION=${PRECISION:-no}
NUM_SAMPLES=${NUM_SAMPLES:-64}
ANCESTRAL_STEPS=${ANCESTRAL_STEPS:-"64 256"}  # each step draws (V + 1)-way categoricals everywhere: slow on a CPU
PY=${PY:-python}
mkdir -p "$RUNS"

# Models: the MDM and the AR baseline have the same width and depth; the judge is wider and deeper (GPT-2 Large's role).
echo "{\"hidden_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"cond_dim\": 64,
       \"max_position_embeddings\": $LENGTH, \"dropout\": 0.0}" > "$RUNS/mdm.json"
echo "{\"model_type\": \"gpt2\", \"n_embd\": 128, \"n_layer\": 2, \"n_head\": 4, \"n_positions\": $LENGTH}" > "$RUNS/ar.json"
echo "{\"model_type\": \"gpt2\", \"n_embd\": 192, \"n_layer\": 3, \"n_head\": 6, \"n_positions\": $LENGTH}" > "$RUNS/judge.json"

train() {  # same data, tokenizer, block size and batch for all three
    $PY -m hf_mdm.training.cli --train-files "$DATA/train.txt" --validation-files "$DATA/validation.txt" \
        --tokenizer "$DATA/tokenizer" --block-size "$LENGTH" --batch-size "$BATCH" --lr 1e-3 --warmup-steps 50 \
        --mixed-precision "$PRECISION" --eval-every 300 --eval-blocks 64 --save-every 0 --log-every 50 "$@"
}
train --model-config "$RUNS/mdm.json" --max-steps "$STEPS" --output-dir "$RUNS/mdm" > "$RUNS/mdm.log" 2>&1
train --objective ar --model-config "$RUNS/ar.json" --max-steps "$STEPS" --output-dir "$RUNS/ar" > "$RUNS/ar.log" 2>&1
train --objective ar --model-config "$RUNS/judge.json" --max-steps "$JUDGE_STEPS" --seed 1 --output-dir "$RUNS/judge" \
    > "$RUNS/judge.log" 2>&1

# shellcheck disable=SC2086  # ANCESTRAL_STEPS is a list
$PY -m hf_mdm.evaluation.cli "$RUNS/mdm/model" --judge "$RUNS/judge/model" \
    --reference-files "$DATA/validation.txt" --nelbo --nelbo-passes 4 \
    --samplers first_hitting ancestral --tokens-per-step 1 4 --steps $ANCESTRAL_STEPS \
    --sampling-dtypes float64 float32 --num-samples "$NUM_SAMPLES" --batch-size 64 --length "$LENGTH" \
    --ar-model "$RUNS/ar/model" --ar-temperatures 0.7 0.8 0.9 1.0 --save-samples --output-dir "$RUNS/eval"
