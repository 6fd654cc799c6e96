# Two set-up commands: `make demo` and `make test`. Each creates .venv only when it is
# missing or when pyproject.toml or requirements.lock changed since it was built.
# requirements.lock pins every package (transitive ones too) to the versions the suite passed
# with, so two fresh machines install the same thing; `make lock` refreshes it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv lock clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c requirements.lock -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lethe run split_digits

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=25

# Bring requirements.lock in line with pyproject.toml (pip-tools, in a throwaway venv so its own
# dependencies never enter the lock): pins that still fit stay; `make lock UPGRADE=1` moves every
# package to the newest version its range allows. Then `make test` before committing the lock.
lock:
	@test -x .venv-lock/bin/pip-compile || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet pip-tools)
	.venv-lock/bin/pip-compile --quiet $(if $(UPGRADE),--upgrade) --extra test --strip-extras --no-emit-index-url \
		--no-emit-find-links --output-file requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) .venv-lock lethe_runs mlflow.db mlruns
