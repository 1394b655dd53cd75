# The two set-up commands of the README:
#   make serve   install everything and start the whole service on this machine
#   make test    install everything (nginx, chromium and chromedriver, redis-server,
#                redis-sentinel, wrk and faketime too, where missing) and run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install serve test secrets nginx browser redis wrk faketime

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/python run_keras_server.py

# Redis' passwords for docker-compose.yml (.env) and deploy/k8s (a Secret), generated once.
secrets:
	sh deploy/make-secrets.sh

# The topology tests put nginx in front of gunicorn; install it from the system's packages.
nginx:
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null)

# The page's tests drive Debian's chromium through its chromedriver.
browser:
	@command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq chromium chromium-driver >/dev/null)

# The Sentinel and Cluster tests run Debian's redis-server, redis-sentinel and redis-cli.
redis:
	@command -v redis-sentinel >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq redis-server redis-sentinel >/dev/null)

# The benchmarks' load generator (and its test).
wrk:
	@command -v wrk >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)

# The clock-skew tests run a process whose clock is set ahead or behind by libfaketime.
faketime:
	@command -v faketime >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null)

test: install nginx browser redis wrk faketime
	$(BIN)/python -m pytest
