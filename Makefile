# make train: set up .venv and train the default Transformer on Multi30k de->en, then
#             translate the test set and a few example sentences.
# make test:  set up .venv and run the test suite.
PY := .venv/bin/python
SHARED_DATA := $(abspath ../shared/data)
export HF_DATASETS_OFFLINE ?= $(if $(wildcard $(SHARED_DATA)),1,0)
export HF_HUB_OFFLINE ?= $(HF_DATASETS_OFFLINE)
ifneq ($(wildcard $(SHARED_DATA)/multi30k),)
export MT_DATA_DIR ?= $(SHARED_DATA)
endif
RUN ?= outputs/multi30k-de-en/transformer/make-train
# more settings for make train's train.py, e.g. ARGS="trainer.max_time_minutes=60"
ARGS ?=
# The torch that .venv gets first (pip requirement words): the pinned release by default;
# e.g. TORCH="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130" for a CUDA build
TORCH ?= torch==2.13.0

.PHONY: venv train test lint

.venv/installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: .venv/installed

train: venv
	$(PY) train.py model=transformer data=multi30k data.src_lang=de data.tgt_lang=en decode=beam hydra.run.dir=$(RUN) $(ARGS)
	printf 'Zwei Hunde spielen im Schnee.\nEine Frau mit einem roten Hut fährt Fahrrad.\nEin kleines Mädchen lacht.\n' \
	  | $(PY) translate.py ckpt=$(RUN)

test: venv
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .
