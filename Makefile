# Every job installs what it needs first: `make run` or `make test` on a fresh clone is all a user types.
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# The browser test drives Debian's Chromium (Playwright never downloads a browser here).
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# The demo page's Firefox test drives Debian's Firefox ESR over WebDriver BiDi (skipped where there is none).
/usr/bin/firefox-esr:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq firefox-esr

# Triton's own venv (splitleak.cloud.triton): the nvidia-pytriton wheel bundles tritonserver and its Python backend,
# which needs numpy < 2. A no-op when it holds what splitleak.cloud.triton.REQUIREMENTS lists.
triton-venv: install  ## Triton's venv (.venv-triton), for `splitleak triton serve` and its tests
	$(BIN)/splitleak triton venv

# MLServer's own venv (splitleak.cloud.mlserver): MLServer installs only beside protobuf < 7.
mlserver-venv: install  ## MLServer's venv (.venv-mlserver), for `splitleak mlserver serve` and its tests
	$(BIN)/splitleak mlserver venv

.PHONY: install triton-venv mlserver-venv run demo test test-fast test-firefox bench lint protos
install: $(BIN)/.installed

run: install  ## the cloud and the device as two processes, 200 frames, per-stage latency
	$(BIN)/splitleak run

demo: install  ## the live attack demo in the browser: prints the address to open
	$(BIN)/splitleak demo

test: install triton-venv mlserver-venv /usr/bin/chromium /usr/bin/firefox-esr  ## the whole suite: real processes, gRPC, data, Chromium, Firefox, Triton
	$(BIN)/pytest

test-fast: install  ## the quick loop: everything but what trains, streams many frames, sweeps or drives a browser
	$(BIN)/pytest -m "not slow"

test-firefox: install /usr/bin/firefox-esr  ## the demo's page in a real Firefox
	$(BIN)/pytest tests/test_demo.py -k firefox

bench: install triton-venv mlserver-venv  ## the benchmarks in bench/, side by side against their baselines
	$(BIN)/pytest bench -o python_files="bench_*.py" --benchmark-enable --benchmark-columns=median,iqr,rounds -p no:randomly

lint: install  ## ruff check and ruff format --check, as CI runs them
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

protos: install  ## regenerate protos/*_pb2*.py from protos/inference.proto
	$(BIN)/python -m splitleak.protogen
