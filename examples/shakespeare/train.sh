#!/usr/bin/env bash
# The commands that trained the two checkpoints shipped in src/hf_mdm/pretrained/ (their model cards give the
# step counts and the validation figures):
#
#   python examples/shakespeare/prepare.py        # data/shakespeare: train/validation/test splits and tokenizer
#   bash examples/shakespeare/train.sh mdm        # the time-agnostic MDM   -> runs/shakespeare-mdm/model
#   bash examples/shakespeare/train.sh ar         # the GPT-2-style judge    -> runs/shakespeare-ar/model
#
# The shipped ones ran on one H100 with PRECISION=bf16 (the default here). On a CPU set PRECISION=no and expect
# roughly a day for the MDM. Every setting below can be overridden from the environment.
set -euo pipefail
which=${1:?usage: train.sh mdm|ar}
DATA=${DATA:-data/shakespeare}
HF_MDM=${HF_MDM:-hf-mdm}
PRECISION=${PRECISION:-bf16}
here=$(dirname "$0")
common=(--train-files "$DATA/train.jsonl" --validation-files "$DATA/validation.jsonl" --tokenizer "$DATA/tokenizer"
        --block-size 256 --mixed-precision "$PRECISION" --seed "${SEED:-0}")
case $which in
  mdm)
    # MDLM's recipe (continuous-time NELBO, log-linear schedule, no weight decay, EMA), time-agnostic network.
    $HF_MDM train "${common[@]}" --objective mdm --model-config "$here/mdm.json" \
      --batch-size "${MDM_BATCH:-128}" --lr "${MDM_LR:-2e-3}" --min-lr "${MDM_MIN_LR:-2e-4}" --warmup-steps 500 \
      --weight-decay 0.0 --ema-decay "${MDM_EMA:-0.999}" --max-steps "${MDM_STEPS:-11960}" \
      --eval-every 1000 --eval-blocks 256 --save-every 2000 --output-dir "${OUTPUT_DIR:-runs/shakespeare-mdm}" ;;
  ar)
    # nanoGPT's recipe; with 1.4 M training tokens the AR model overfits early, hence dropout 0.2 and few epochs.
    $HF_MDM train "${common[@]}" --objective ar --model-config "$here/ar.json" \
      --batch-size "${AR_BATCH:-64}" --lr "${AR_LR:-6e-4}" --min-lr "${AR_MIN_LR:-6e-5}" --warmup-steps 200 \
      --weight-decay 0.1 --beta2 0.99 --max-steps "${AR_STEPS:-2416}" \
      --eval-every 250 --save-every 1000 --output-dir "${OUTPUT_DIR:-runs/shakespeare-ar}" ;;
  *) echo "usage: train.sh mdm|ar" >&2; exit 2 ;;
esac
