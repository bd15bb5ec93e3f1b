#!/bin/bash
# Pretrain the embedded tiny model on a GPU machine, then evaluate it; everything lands under $OUT.
# Wheels in .whl/ (diffusers, for a machine without it or without network access) are installed first:
#   OUT=/tmp/out [SAMPLERS="DDIMScheduler ..."] [PACK="vae"] bash bench/tiny_pretrain_gpu.sh TRAIN_LIMIT_S EVAL_N [pretrain args...]
# pretrain runs under `timeout TRAIN_LIMIT_S` so that its last save is still packed and evaluated when it runs
# long. SAMPLERS names more diffusers schedulers to evaluate besides the model's own (eval-NAME.json each).
# $OUT gets log.txt, pretrain_log.json, vae_recon.png, eval.json, grid.png and model.tar.part-* (the folder minus tokenizer/, in 15 MB parts,
# small enough to copy back from a remote machine one by one): cat model.tar.part-* | tar -x
# PACK names the model parts to pack (default: all but tokenizer/); EVAL_N 0 skips the evaluation (an autoencoder-only
# run with --unet-steps 0, say).
# Pretrain with a --*-seconds budget that ends well inside TRAIN_LIMIT_S: a run stopped by the limit saves nothing of
# the stage it was in (rendering the pool comes first and takes 25 s for 60k images on 16 cores).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
limit=$1 n=$2; shift 2
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $OUT/log.txt
timeout "$limit" python3 -m sdlora.tiny.pretrain --out /tmp/tiny "$@" 2>&1 | grep -v -e "should be kept in float32" \
  -e "Writing model shards" -e "requires torchvision" | tee -a $OUT/log.txt
echo "pretrain exit ${PIPESTATUS[0]}" | tee -a $OUT/log.txt
cp /tmp/tiny/pretrain_log.json /tmp/tiny/vae_recon.png $OUT/ 2>/dev/null
if [ -n "${PACK:-}" ]; then
  # shellcheck disable=SC2086
  tar -C /tmp/tiny -cf - $PACK pretrain_log.json vae_recon.png | split -b 15M - $OUT/model.tar.part-
else
  tar -C /tmp -cf - --exclude=tokenizer tiny | split -b 15M - $OUT/model.tar.part-
fi
[ "$n" = 0 ] && { ls -la $OUT; exit 0; }
timeout 150 python3 -m sdlora.tiny.eval --model /tmp/tiny --n "$n" --json $OUT/eval.json --grid $OUT/grid.png 2>&1 \
  | grep -v -e "Loading" -e "requires torchvision" | tee -a $OUT/log.txt
for sampler in ${SAMPLERS:-}; do
  timeout 100 python3 -m sdlora.tiny.eval --model /tmp/tiny --n "$n" --scheduler "$sampler" --json "$OUT/eval-$sampler.json" \
    2>&1 | grep -v -e "Loading" -e "requires torchvision" | tee -a $OUT/log.txt
done
ls -la $OUT
