# llama_ref: `make lab` (start here) and `make test` (everything). Other targets regenerate data.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help venv lab test test-fast test-any-cpu fuzz interop interop-env reference reference-env model chat rlhf gatt bench corpus tokenizer clean-venv

help:
	@echo "make lab        create .venv if missing, install, open JupyterLab on notebooks/00_overview.ipynb"
	@echo "make test       the same set-up, then every test including pytest --nbval over all notebooks"
	@echo "make test-any-cpu  the notebooks under OpenBLAS Haswell/SkylakeX kernels at 1 and 2 threads (other CPUs' rounding)"
	@echo "make fuzz       the fuzz suite with 2000 examples per property (make test runs 60)"
	@echo "make interop    (optional) install transformers 4 and 5, Optimum, llama-cpp-python, ONNX Runtime GenAI and"
	@echo "                onnxruntime-qnn in .venv-interop*, then read our files in each of them (tests/test_interop.py)"
	@echo "make reference  regenerate reference fixtures with transformers (installs torch==2.13.0 + transformers)"
	@echo "make model      train the embedded model data/models/tinyworld from scratch (79 min on 2 cores)"
	@echo "make chat       the SFT chat model data/models/tinyworld-chat (about 7 min on 2 cores)"
	@echo "make rlhf       safety SFT, 3 RLHF rounds (comparisons, two reward models, rejection sampling), PPO in the"
	@echo "                last, every policy evaluated: tinyworld-rm, tinyworld-safety-rm, tinyworld-rlhf (<= 75 min)"
	@echo "make gatt       Ghost Attention on top of tinyworld-rlhf + evaluation: tinyworld-gatt (<= 20 min)"
	@echo "make bench      side-by-side benchmarks vs transformers, written into README.md (needs the reference extra)"

# One set-up for everything: a venv with the package (editable), the [dev] extra and the [onnx] extra (its tests).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx]'
	@touch $(STAMP)

venv: $(STAMP)

# Jupyter refuses to start as root (containers often run as root) unless told; LAB_ARGS adds your own flags,
# e.g. make lab LAB_ARGS="--no-browser --ip 0.0.0.0 --port 8888"
LAB_ARGS ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

# default_url: the URL the server prints (and the browser it starts) opens chapter 00, not the Launcher
lab: $(STAMP)
	$(BIN)/jupyter lab $(ROOT_FLAG) --LabApp.default_url=/lab/tree/notebooks/00_overview.ipynb $(LAB_ARGS)

NBVAL := --nbval --nbval-current-env --sanitize-with notebooks/nbval_sanitize.cfg

test: $(STAMP)
	$(BIN)/python -m pytest tests notebooks $(NBVAL)

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -x -q

# Stored outputs must hold on every CPU: nbval under OpenBLAS's AVX2 (Haswell) and AVX-512 (SkylakeX) kernels at 1 and
# 2 threads. On a CPU without AVX-512 the script runs Sandybridge kernels in SkylakeX's place and says so.
test-any-cpu: $(STAMP)
	$(BIN)/python scripts/test_any_cpu.py

# Bad input by family, generated from the code: every file a user gives us mutated, every output path x writer, every
# numeric option, hostile API arguments from the signatures (tests/test_fuzz.py, test_output.py, test_cli_options.py,
# test_arguments.py). make test runs each property with 60 examples; this runs many more (FUZZ_EXAMPLES=...), same
# derandomized choices, so reruns agree.
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	LLAMA_REF_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py tests/test_output.py \
		tests/test_cli_options.py tests/test_arguments.py tests/test_chat.py -q

# The clients people run our files with, in environments of their own (tests/test_interop.py runs in the first):
#   .venv-interop      torch 2.13.0 (installed first: a CPU wheel), transformers 4.57 + Optimum (which pins
#                      transformers < 4.58), ONNX Runtime GenAI, onnxruntime-qnn (a plugin of onnxruntime, imported as
#                      onnxruntime_qnn, so it shares this environment; its Linux x86_64 wheel carries the HTP simulator)
#                      and llama-cpp-python, built without AMX/AVX-512 (a native build crashes on AMX Intel CPUs)
#   .venv-interop-tf5  transformers 5 alone (the tests run it as a subprocess)
# LLAMA_CPP_WHEEL=path/to/llama_cpp_python-0.3.36-*.whl installs a wheel built with the same flags instead of building.
INTEROP     := .venv-interop
INTEROP_TF5 := .venv-interop-tf5
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                        -DGGML_AMX_INT8=OFF -DGGML_AVX512=OFF
LLAMA_CPP_WHEEL ?=

$(INTEROP)/.installed: pyproject.toml
	@test -x $(INTEROP)/bin/python || $(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip install --quiet --upgrade pip
	$(INTEROP)/bin/python -m pip install --quiet torch==2.13.0
	$(INTEROP)/bin/python -m pip install --quiet -e '.[onnx]' pytest==9.2.0 hypothesis==6.170.27
	$(INTEROP)/bin/python -m pip install --quiet optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6 \
	    onnxruntime-qnn==2.7.0 onnxruntime==1.32.0
	$(if $(LLAMA_CPP_WHEEL),$(INTEROP)/bin/python -m pip install --quiet $(LLAMA_CPP_WHEEL),\
	    if command -v c++ >/dev/null; then CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(INTEROP)/bin/python -m pip install \
	    --quiet --no-cache-dir llama-cpp-python==0.3.36; else echo "make interop: llama-cpp-python is built from \
	    source and needs a C++ compiler (c++ is not on PATH): not installed; its tests skip"; fi)
	@test -x $(INTEROP_TF5)/bin/python || $(PYTHON) -m venv $(INTEROP_TF5)
	$(INTEROP_TF5)/bin/python -m pip install --quiet --upgrade pip
	$(INTEROP_TF5)/bin/python -m pip install --quiet transformers==5.23.0 jinja2==3.1.6 sentencepiece==0.2.3
	@touch $@

interop-env: $(INTEROP)/.installed

interop: $(INTEROP)/.installed
	$(INTEROP)/bin/python -m pytest tests/test_interop.py -ra

# torch must be installed first and exactly as 2.13.0 (a local CPU wheel); anything else pulls CUDA.
reference-env: $(STAMP)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx,reference]'

reference: reference-env
	$(BIN)/python scripts/make_reference.py
	$(BIN)/python scripts/make_reference_sampling.py

corpus: $(STAMP)
	$(BIN)/python scripts/make_corpus.py

tokenizer: $(STAMP)
	$(BIN)/python scripts/train_tokenizer.py

model: $(STAMP)
	$(BIN)/python scripts/train_model.py --out data/models/tinyworld --force

# The chat models in the paper's order: SFT (chat) -> RLHF rounds (rlhf) -> Ghost Attention on the RLHF model (gatt).
chat: $(STAMP)
	$(BIN)/python scripts/make_chat.py --force

# Starts from data/models/tinyworld-chat; RLHF_ARGS adds options, e.g. RLHF_ARGS="--time-budget-min 30"
RLHF_ARGS ?=
rlhf: $(STAMP)
	$(BIN)/python scripts/make_rlhf.py --force $(RLHF_ARGS)

# Starts from data/models/tinyworld-rlhf
gatt: $(STAMP)
	$(BIN)/python scripts/make_gatt.py --force

bench: reference-env
	$(BIN)/python benchmarks/forward.py --readme
	$(BIN)/python benchmarks/forward.py --shape tinyworld --readme
	$(BIN)/python benchmarks/decode_profile.py --readme
	$(BIN)/python benchmarks/decode_profile.py --shape tinyworld --readme
	$(BIN)/python benchmarks/train_step.py --readme
	$(BIN)/python benchmarks/quant_accuracy.py --readme
	$(BIN)/python benchmarks/onnx_runtime.py --readme

clean-venv:
	rm -rf $(VENV) $(INTEROP) $(INTEROP_TF5)
