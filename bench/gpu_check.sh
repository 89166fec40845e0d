#!/usr/bin/env bash
# The GPU check: one command for a machine with one CUDA GPU, about 5 minutes.
#   bash bench/gpu_check.sh            # writes out/gpu_check/{results.json,compare.png}
# 1. a short GPU-preset comparison of dec, encdec and bdd (GPT-2-small width, gpt2 tokens, bf16,
#    torch.compile, FlexAttention block masks): the ratio table, results.json and the figure;
# 2. tests/test_gpu_paths.py with the slow tests: on the GPU, cached == uncached (float32 and
#    bf16), FlexAttention == dense masks in bf16 (forward and backward), compiled == eager
#    training; and the same CPU checks as CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
python compare.py --preset gpu --out_dir out/gpu_check --max_iters 200 --eval_interval 100 \
    --warmup_iters 20 --repeats 5 "$@"
python -m pytest tests/test_gpu_paths.py -m "" -rs
