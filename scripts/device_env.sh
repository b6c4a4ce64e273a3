# Sourced by the GPU scripts (h200_train_step.sh, multi_gpu.sh): fails without $OUT, installs Ray from the carried
# slim bundle unless RAYBUNDLE is set empty (Ray installed already), and exports what every run there needs.
set -u
: "${OUT:?set OUT to the folder for the results}"
BUNDLE=${RAYBUNDLE-.raybundle/install.sh}  # RAYBUNDLE= (empty): Ray is installed already
if [ -n "$BUNDLE" ] && [ -f "$BUNDLE" ]; then source "$BUNDLE" || exit 1; fi
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
