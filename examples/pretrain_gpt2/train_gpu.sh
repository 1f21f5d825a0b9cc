#!/usr/bin/env bash
# GPT-2 (124M) pretraining on one 8-GPU node with every checkpoint evaluated by HELM.
#
#   DATA=/data/my_corpus_text_document VOCAB=/data/gpt2-vocab.json MERGES=/data/gpt2-merges.txt \
#   HELM_DATA=/shared/helm_data bash examples/pretrain_gpt2/train_gpu.sh
#
# Run it where megatron-core's `megatron` package is importable (a Megatron-LM checkout on
# PYTHONPATH, or an NGC container). Scores appear in the W&B run "gpt2-124m" beside the loss.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
: "${DATA:?set DATA to the .bin/.idx prefix of your tokenized corpus}"
: "${VOCAB:?set VOCAB to gpt2-vocab.json}"
: "${MERGES:?set MERGES to gpt2-merges.txt}"
: "${HELM_DATA:?set HELM_DATA to the offline HELM data folder (see the README)}"
SAVE="${SAVE:-checkpoints/gpt2-124m}"
GPUS="${GPUS:-8}"

export CUDA_DEVICE_MAX_CONNECTIONS=1

torchrun --nproc-per-node "$GPUS" "$HERE/pretrain_gpt2.py" \
    --num-layers 12 --hidden-size 768 --num-attention-heads 12 \
    --seq-length 1024 --max-position-embeddings 1024 \
    --micro-batch-size 8 --global-batch-size 256 \
    --train-iters 100000 --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
    --weight-decay 0.1 --clip-grad 1.0 --bf16 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --data-path "$DATA" --split 949,50,1 \
    --save "$SAVE" --save-interval 2000 --ckpt-format torch_dist \
    --log-interval 100 --eval-interval 2000 --eval-iters 10 \
    --tensorboard-dir "$SAVE/tensorboard" \
    --wandb-project "${WANDB_PROJECT:-megatron-gpt2}" --wandb-exp-name gpt2-124m \
    --eval-hook-config "$REPO/conf/helm.yaml" \
    --eval-hook-override "data_dir=$HELM_DATA" \
    --eval-hook-override schedule.every=2000
