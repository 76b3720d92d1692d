#!/bin/bash
# one device run: GPU training time of the packaged PET checkpoint's config, and bench_potts on the GPU
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devrun/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VBSEG_JAX_CACHE=/tmp/jaxcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, numpyro, equinox; print(jax.__version__, numpyro.__version__, equinox.__version__, jax.devices())"
start=$(date +%s)
python3 -m vbseg.cli train .devrun/train_pet.toml --out $OUT/deep_pet_gpu.eqx 2>&1 | grep -v -i warn | tail -25
echo "train wall $(( $(date +%s) - start )) s"
start=$(date +%s)
python3 -m benchmarks.bench_potts --sizes 64,144,192 --repeats 3 --numpy-iterations 1 --gibbs-sweeps 10 --out $OUT 2>&1 | grep -v -i "warn\|constant fold\|slow_op\|xla_dump\|reduce-window\|inherently" | tail -12
echo "bench_potts wall $(( $(date +%s) - start )) s"
