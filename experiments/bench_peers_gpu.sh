#!/bin/bash
# bench_peers.py on a GPU machine (issue 18: the loop strategy per backend), as run for
# experiments/results/bench_peers_gpu_host.json on one NVIDIA H200 (jax 0.11.2 with CUDA 13,
# torch 2.11 + torchvision there). Prepare in the repository root, where pip can download:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform any -d .whl pyhessian curvlinops-for-pytorch \
#     hessian-eigenthings backpack-for-pytorch einconv unfoldNd
#   mkdir -p .gpu && cp "$(.venv/bin/python -c 'import hessjax.models as m; print(m.mobilenet_v2_weights_path())')" .gpu/mobilenet_v2.pth
# then run this file there with .whl and .gpu beside the checkout; results go to $OUT.
# The first command (the loop inside one program, and the torch peers on cuda) is stopped by
# its timeout when XLA's first Hutchinson program is as slow as it was on the H200 (109 s).
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/bench_peers_gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export HESSJAX_MOBILENET_V2_WEIGHTS=$PWD/.gpu/mobilenet_v2.pth
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 HESSJAX_COMPILATION_CACHE=/tmp/jaxcache
nvidia-smi -L
python3 -c "import jax, flax, optax, chex, orbax.checkpoint, torch; print(jax.__version__, flax.__version__, optax.__version__, torch.__version__, jax.devices())" || exit 1
T="hvp hutchinson hutchpp top1 top5 density quadform measure_reference measure_canonical"
git log -1 --format=%H > $OUT/commit.txt 2>/dev/null
timeout 250 python3 experiments/bench_peers.py --map-fn vmap --torch-python python3 --torch-device cuda \
  --all-peers --rounds 3 --tasks $T --out $OUT/bench_peers_gpu_vmap.json 2>&1 | grep -v "^ \|^{\|^}" | tee $OUT/log_vmap.txt
timeout 170 python3 experiments/bench_peers.py --map-fn host --rounds 3 \
  --tasks hvp hutchinson hutchpp top1 top5 density quadform power5 --out $OUT/bench_peers_gpu_host.json 2>&1 | grep -v "^ \|^{\|^}" | tee $OUT/log_host.txt
echo finished
