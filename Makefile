# rearlib: the two commands a new user needs are `make reproduce` and `make test`.
# Both create .venv on first use (PyPI only; no other download), so they work on a clean clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SCALE  ?= smoke
ONLY   ?=
PARAMS ?=
JOBS   ?= 1

# Some environments set PYTHONDONTWRITEBYTECODE; then every test process and notebook kernel re-compiles torch's
# Python sources (10-25 s each). Let Python cache bytecode inside .venv.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup reproduce test test-all lint-notebooks sync-notebooks clean-smoke help

help:
	@echo "make reproduce [SCALE=smoke|small|paper] [ONLY=01_data,02_tokenizer] [PARAMS='key=value ...'] [JOBS=N]  - run the notebooks (N at a time), write reports/ and figures/"
	@echo "make test                                                             - unit tests + every notebook at smoke scale"
	@echo "make test-all                                                         - also the slow tests"
	@echo "make sync-notebooks                                                   - regenerate notebooks/*.ipynb from the .py scripts"

setup: $(VENV)/.installed

# uv resolves and installs the ~30 wheels in parallel and, unlike pip here, ignores local find-links that
# could pair a CPU-only torch with PyPI's torchvision (see constraints.txt).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv>=0.4"
	$(BIN)/uv pip install --python $(BIN)/python --constraints constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 --display-name "Python 3 (rearlib)" >/dev/null
	touch $@

reproduce: setup
	$(BIN)/python -m rearlib reproduce --scale $(SCALE) --jobs $(JOBS) $(if $(ONLY),--only $(ONLY)) $(foreach p,$(PARAMS),--param $(p))

# pytest exits 5 when it collected nothing: treat that as a failure, not a pass.
test: setup
	@$(BIN)/python -m pytest -q -m "not slow and not gpu" --timeout 900; s=$$?; \
	if [ $$s -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$s

test-all: setup
	$(BIN)/python -m pytest -q --timeout 1800

sync-notebooks: setup
	$(BIN)/python -m rearlib notebook sync

clean-smoke:
	rm -rf reports/smoke figures/smoke
