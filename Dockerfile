# One image for both tiers: `python run_keras_server.py web` (gunicorn) and
# `python run_keras_server.py model` (a model worker); docker-compose.yml picks the command.
#
#   docker build -t keras-server .                     # CPU: tensorflow-cpu, requirements.txt
#   docker build -t keras-server --build-arg GPU=1 .   # NVIDIA GPU: tensorflow[and-cuda] instead
FROM python:3.11-slim

ARG GPU=0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /app

# Dependencies first, in their own layer: editing the code does not reinstall TensorFlow.
COPY requirements.txt .
# The GPU build swaps tensorflow-cpu for tensorflow[and-cuda] at the same pinned version (its
# pip-installed CUDA libraries need only the host's NVIDIA driver); everything else is identical.
RUN if [ "$GPU" = "1" ]; then \
        tf_version="$(sed -n 's/^tensorflow-cpu==//p' requirements.txt)" && \
        grep -v '^tensorflow-cpu==' requirements.txt > /tmp/requirements.txt && \
        pip install -r /tmp/requirements.txt "tensorflow[and-cuda]==${tf_version}"; \
    else \
        pip install -r requirements.txt; \
    fi

COPY *.py ./
COPY serving/ serving/
COPY data/ data/

# Not root. Keras caches downloaded ImageNet weights in ~/.keras; compose mounts a volume there so
# each model container downloads them once.
RUN useradd --create-home --uid 1000 app && mkdir -p /home/app/.keras /home/app/.cache/keras-server/openvino \
    && chown -R app /home/app/.keras /home/app/.cache
USER app

EXPOSE 5000
CMD ["python", "run_keras_server.py", "web"]
