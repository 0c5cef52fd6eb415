# Fresh machine: `make demo` (set up, then train/score/analyse on generated data) or `make test`.
# Set-up makes .venv and installs torch only if the venv cannot import it yet: on a CPU-only machine that is
# TORCH_INSTALL (the CPU build here); GPU users install their CUDA build of torch into .venv first (README).
PYTHON ?= python3
VENV ?= .venv
TORCH_INSTALL ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

# The demo: a tiny random-CLIP model trained on generated PhraseCut-format data, on the CPU (README, "The demo").
DEMO_DATA ?= synthetic_phrasecut
DEMO_IMAGES ?= 1500
# fp32 (--precision=fp32): the tiny model's matrices are too small for bf16 to pay, also on CPUs that have it natively.
# Two departures from the recipe, for 10 minutes on 2 cores (README, "The demo"): two phrases of an image share each
# crop (--prompts-per-image=2: 16 crops per batch of 32, the vision pass and the image reads halve), and 10% negatives:
# the generated grammar's unique phrases are 76% relations, so the recipe's 20% (drawn from unique phrases) made
# relation phrases the empty target in half of their samples.
DEMO_TRAIN ?= --backbone=tiny --device=cpu --image-size=128 --batch-size=32 --max-iterations=4400 --ckpt=500 \
	--num-workers=1 --refined --reduce-dim=64 --extract-layers=0,1,2 --lr=1.5e-3 --dropout=0 --whole-image-prob=0.5 \
	--precision=fp32 --val-interval=1100 --val-samples=200 --prompts-per-image=2 --negative-prob=0.1
# fp32: the tiny model's layers are too small for int8 or bf16 to pay (and its figures stay comparable).
DEMO_EVAL ?= --data=synthetic --data-root=$(DEMO_DATA) --device=cpu --num-workers=1 --precision=fp32

# The benchmark demo: one-shot and zero-shot scoring of checkpoints/demo on generated VOC and COCO-20i data.
FEWSHOT_VOC ?= synthetic_voc
FEWSHOT_COCO ?= synthetic_coco
FEWSHOT_EVAL ?= --device=cpu --num-workers=1 --batch-size=8 --precision=fp32

.PHONY: setup setup-export setup-openvino setup-app test lint demo demo-fewshot export app

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-benchmarks.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_INSTALL)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

# Optional ONNX export and backend (export.py, predict.py --backend onnx); the tests install it too.
setup-export: $(VENV)/.installed-export

$(VENV)/.installed-export: requirements-export.txt $(VENV)/.installed
	$(BIN)/python -m pip install -q -r requirements-export.txt
	touch $@

# Optional OpenVINO backend and its export (fp32, bf16, NNCF int8) on top of the ONNX export; the tests install it too.
setup-openvino: $(VENV)/.installed-openvino

$(VENV)/.installed-openvino: requirements-openvino.txt $(VENV)/.installed-export
	$(BIN)/python -m pip install -q -r requirements-openvino.txt
	touch $@

# make export EXPORT_MODEL=CIDAS/clipseg-rd64-refined EXPORT_DIR=exported (README, "Precision and ONNX")
EXPORT_MODEL ?= CIDAS/clipseg-rd64-refined
EXPORT_DIR ?= exported
export: setup-export
	$(BIN)/python export.py --model $(EXPORT_MODEL) --out $(EXPORT_DIR)

# The web app's optional dependencies (requirements-app.txt), on top of set-up; `make test` installs them too.
setup-app: $(VENV)/.installed-app

$(VENV)/.installed-app: $(VENV)/.installed requirements-app.txt
	$(BIN)/python -m pip install -q -r requirements-app.txt
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup setup-export setup-openvino setup-app lint
	$(BIN)/python -m pytest

demo: setup
	test -f $(DEMO_DATA)/data/VGPhraseCut_v0/image_data_split.json || \
		$(BIN)/python -m clipseg.synthetic phrasecut --root $(DEMO_DATA) --n-images $(DEMO_IMAGES)
	if [ -f checkpoints/demo/train_state.pt ]; then $(BIN)/python train.py --name=demo --resume; \
	else $(BIN)/python train.py --name=demo --data=synthetic --data-root=$(DEMO_DATA) $(DEMO_TRAIN); fi
	$(BIN)/python score.py demo $(DEMO_EVAL)
	$(BIN)/python score.py demo $(DEMO_EVAL) --shuffle-prompts > /dev/null
	$(BIN)/python failure_test.py --name=demo $(DEMO_EVAL)
	$(BIN)/python -c "import json; j = lambda f: json.load(open('checkpoints/demo/' + f))['paper']['miou']; \
		a, b = j('scores_test.json'), j('scores_test_shuffled.json'); \
		print(f'demo: mIoU at t=0.3 {a:.3f}; with phrases shuffled across samples {b:.3f} (drop {a - b:.3f})')"

demo-fewshot: setup
	test -f $(FEWSHOT_VOC)/lists/pascal/val.txt || $(BIN)/python -m clipseg.synthetic voc --root $(FEWSHOT_VOC) --n-images 60
	test -f $(FEWSHOT_COCO)/annotations/instances_val2014.json || \
		$(BIN)/python -m clipseg.synthetic coco --root $(FEWSHOT_COCO) --n-images 80
	test -f checkpoints/demo/config.json || $(MAKE) demo
	test -f $(DEMO_DATA)/data/VGPhraseCut_v0/image_data_split.json || \
		$(BIN)/python -m clipseg.synthetic phrasecut --root $(DEMO_DATA) --n-images $(DEMO_IMAGES)
	$(BIN)/python score.py demo --data pascal5i --data-root $(FEWSHOT_VOC) --prompt-kind visual $(FEWSHOT_EVAL)
	$(BIN)/python score.py demo --data pascal5i --data-root $(FEWSHOT_VOC) --prompt-kind text $(FEWSHOT_EVAL)
	$(BIN)/python score.py demo --data pascal5i --data-root $(FEWSHOT_VOC) --protocol hsnet --episodes 100 $(FEWSHOT_EVAL)
	$(BIN)/python score.py demo --data coco20i --data-root $(FEWSHOT_COCO) --episodes 100 $(FEWSHOT_EVAL)
	$(BIN)/python score.py demo --data voc-zeroshot --data-root $(FEWSHOT_VOC) --unseen 10 $(FEWSHOT_EVAL)
	$(BIN)/python score.py demo --data synthetic --data-root $(DEMO_DATA) --prompt-kind visual $(FEWSHOT_EVAL)

# The web app on http://127.0.0.1:7860 with the run of `make demo`, e.g. make app APP_MODEL=myrun APP_ARGS="--port 8000".
# A hub id needs the network: make app HF_HUB_OFFLINE=0 APP_MODEL=CIDAS/clipseg-rd64-refined.
APP_MODEL ?= demo
APP_ARGS ?=
app: setup-app
	$(BIN)/python app.py --model $(APP_MODEL) $(APP_ARGS)
