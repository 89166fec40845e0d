#!/usr/bin/env bash
# The GPU check: one command for a machine with one CUDA GPU, about 7 minutes.
#   bash bench/gpu_check.sh            # writes out/gpu_check/{results.json,compare.png}
# 1. a short GPU-preset comparison of dec, encdec and bdd (GPT-2-small width, gpt2 tokens, bf16,
#    torch.compile, FlexAttention block masks): the ratio table, the one-turn serving benchmark
#    and the multi-turn workload (bdd offload included: on CUDA it moves the encoder cache to
#    pinned host memory between turns), results.json and the figure;
# 2. decode steps with caches grown in chunks against caches allocated for the whole context
#    (bench/cache_growth.py, GPU-preset shapes, bf16);
# 3. tests/test_gpu_paths.py with the slow tests: on the GPU, cached == uncached (float32 and
#    bf16), FlexAttention == dense masks in bf16 (forward and backward), compiled == eager
#    training, offload gives keep's tokens and logits with the encoder cache in pinned host
#    memory, and serve.memory.nbytes()'s held cuda bytes are what memory_allocated() grew by; and
#    the same CPU checks as CI.
# Without a CUDA GPU it runs nothing and exits 1 with one line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu_check.sh: no CUDA GPU visible to torch: this check needs one; nothing run")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)
EOF
python compare.py --preset gpu --out_dir out/gpu_check --max_iters 200 --eval_interval 100 \
    --warmup_iters 20 --repeats 5 "$@"
python bench/cache_growth.py --shape gpu --device cuda --dtype bfloat16 --rounds 5
python -m pytest tests/test_gpu_paths.py -m "" -rs
