#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU: the tests marked `cuda` (device placement, mixed
# precision, resume on CUDA, ONNX parity of a CUDA-trained model, onnxruntime's CUDA provider
# when installed), training speed on CUDA against each lever, then a default run on CUDA on the
# generated 60k set: the whole flow when Prefect and MLflow are installed, else the same default
# training without them; the photo pipeline's training speed on CUDA (prepare_speed.py); last, one
# training on 1 GPU and on all of them (DistributedDataParallel, NCCL: ddp_scaling.py).
# Prints the figures.
#
#     bash benchmarks/gpu_check.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir="${1:-data/benchmarks}"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a machine with a GPU"
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)}")
PY
python -m pytest -q -p no:cacheprovider -m cuda -rs -s tests/test_cuda.py
python benchmarks/train_speed.py --device cuda --samples 60000
python benchmarks/digits60k.py "$data_dir"
if python -c "import prefect, mlflow" 2>/dev/null; then
    scratch="$(mktemp -d)"
    MLFLOW_TRACKING_URI="sqlite:///$scratch/mlflow.db" PREFECT_HOME="$scratch/prefect" \
        /usr/bin/env time -f "default run on CUDA: %e s wall" \
        python flows/train_flow.py --device cuda --data-dir "$data_dir" --output-dir "$scratch/outputs"
else
    echo "Prefect or MLflow not installed: the default training on CUDA without the flow"
    python benchmarks/default_settings.py --device cuda --datasets digits60k --data-dir "$data_dir"
fi
# The photo pipeline on CUDA: one epoch per backbone and size fed by the prepared file (augmented
# on the GPU) against ImageFolder + DataLoader (augmented per image in the workers), same network
# and levers; the table goes to benchmarks/results/prepare_speed_cuda.md.
python benchmarks/prepare_speed.py --device cuda --prepare-sizes "" --train-images 2048 \
    --models resnet18,resnet50,mobilenet_v3_large,efficientnet_b0,convnext_tiny --sizes 64,128,224 \
    --output benchmarks/results/prepare_speed_cuda.md
# DistributedDataParallel: the default training on one GPU, then on every GPU (one process each,
# NCCL, started by torch's elastic launcher as --devices does); into ddp_scaling_cuda.md.
python benchmarks/ddp_scaling.py --device cuda --data-dir "$data_dir" --skip-memory
