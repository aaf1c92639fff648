#!/usr/bin/env bash
# Janus-Pro-1B-shaped decoding-step benchmark on a GPU machine: full size, bf16, all 24 rows of tokens,
# the database searched on the CPU and, where the faiss-gpu wheel installs, on the GPU.
# One command; the last lines are a table.   Usage: bash benchmarks/janus_gpu.sh [ENTRIES]
set -euo pipefail
cd "$(dirname "$0")/.."
entries="${1:-1000000}"
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q -e ".[janus]"
pip install -q --force-reinstall "torch>=2.4"          # the CUDA build of torch, on a GPU machine
echo "| device | dtype | entries | k | s/step base | s/step DAiD | ratio |" > /tmp/arrag-gpu-table.md
python benchmarks/janus_step_overhead.py --entries "$entries" --rows 24 --device cuda --dtype bfloat16 \
    | tail -1 >> /tmp/arrag-gpu-table.md
if pip install -q faiss-gpu 2>/dev/null && python -c "import faiss; faiss.StandardGpuResources()" 2>/dev/null; then
    python benchmarks/janus_step_overhead.py --entries "$entries" --rows 24 --device cuda \
        --dtype bfloat16 --faiss-gpu | tail -1 | sed 's/| cuda |/| cuda + faiss-gpu |/' >> /tmp/arrag-gpu-table.md
else
    echo "| faiss-gpu not installable here: search ran on the CPU only | | | | | | |" >> /tmp/arrag-gpu-table.md
fi
cat /tmp/arrag-gpu-table.md
