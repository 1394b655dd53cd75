"""The service, one folder per part of its architecture:

- wire/     what crosses Redis between the tiers: keys, connections, the job format, the queue's
            scripts, the rollouts' records;
- web/      the web tier: the Flask app, submitting jobs and collecting results, the protocols
            (the tutorial's /predict and /v2), the API's docs, the gevent worker, the page;
- model/    the model worker: runtimes and precisions, batch sizing, claiming and answering jobs;
- rollout/  model versions: the supervisor, the process that serves one version, `reload`.

images.py, errors.py, text.py, redis_urls.py and metrics.py are shared by the web tier and the
model worker; settings.py (at the root) reads text.py and redis_urls.py only. processes.py runs
the whole service on one machine.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's root
RUN_KERAS_SERVER = os.path.join(ROOT, "run_keras_server.py")  # every process's command
