#!/usr/bin/env bash
# Train the three configs/experiments/gpu/aspirin_fp32_gpu_*.yaml side by side on one GPU, then copy each
# run's best.pt and final.pt and the logs (7 files, under 16 MB each) to OUTDIR. Run from the
# repository root with the rMD17 split files in ../shared/rmd17: bash configs/experiments/gpu/run.sh OUTDIR
set -u
out=${1:?usage: run.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 QEQ_CACHE_DIR=${QEQ_CACHE_DIR:-/tmp/qeq_cache}
python3 -c "import torch, e3nn; print('torch', torch.__version__, 'e3nn', e3nn.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
# Several small training processes share the card far better through MPS; keep it only if a
# CUDA client can connect through it.
if command -v nvidia-cuda-mps-control >/dev/null && timeout 20 nvidia-cuda-mps-control -d 2>/dev/null \
   && timeout 60 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()" 2>/dev/null; then
  echo "MPS: on"
else
  echo quit | timeout 10 nvidia-cuda-mps-control 2>/dev/null; echo "MPS: off"
fi
names=(b16 b32 b64)
mkdir -p runs
for n in "${names[@]}"; do
  timeout "${TRAIN_TIMEOUT_S:-530}" python3 -m qeq_ase.train "configs/experiments/gpu/aspirin_fp32_gpu_$n.yaml" --device "${DEVICE:-cuda}" --threads 1 > "runs/train_$n.log" 2>&1 &
done
wait
for n in "${names[@]}"; do
  cp "runs/aspirin_fp32_gpu_$n/best.pt" "$out/aspirin_fp32_gpu_${n}_best.pt"
  cp "runs/aspirin_fp32_gpu_$n/final.pt" "$out/aspirin_fp32_gpu_${n}_final.pt"
  tail -3 "runs/train_$n.log"
done
tar czf "$out/logs.tgz" runs/train_*.log runs/aspirin_fp32_gpu_*/log.csv runs/aspirin_fp32_gpu_*/config.yaml
