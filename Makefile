# The two commands in the README: `make demo` (the main job) and `make test` (the tests).
# Each builds its own virtual environment from constraints.txt on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED ?= $(abspath ../shared)
DEMO_OUT ?= out/demo

.PHONY: venv test lint format demo demo-real bench clean browser java

venv: $(VENV)/.installed

# The report test opens the HTML in a real headless Chromium (Debian's package). Installed
# when missing and this user can; without it that test skips and says why.
browser:
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; \
		else echo "chromium missing and no root: the report's browser test will skip"; fi; }

# The docs' Spark queries run in the tests on pyspark, which needs a Java runtime: Debian's
# headless JRE, installed the same way when missing (without it those tests skip and say why).
java:
	@command -v java >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null; \
		elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq default-jre-headless >/dev/null; \
		else echo "java missing and no root: the Spark tests will skip"; fi; }

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,onnx,smp,demo,geo]'
	touch $@

test: venv browser java
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: venv
	$(BIN)/segflow demo --out "$(DEMO_OUT)"

# The same, plus the CamVid frames of ../shared with the ESPNet model (its card's figures).
demo-real: venv
	SEGFLOW_SHARED="$(SHARED)" $(BIN)/segflow demo --out "$(DEMO_OUT)" --real

bench: venv
	$(BIN)/python bench/rle_encode.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/model_forward.py
	$(BIN)/python bench/coco_map.py
	$(BIN)/python bench/evaluate_slice.py
	$(BIN)/python bench/query_memory.py
	$(BIN)/python bench/segment.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/device_feed.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
