"""The web tier: the Flask app built by its factory in each gunicorn process (app), POST /predict
in front of it (predict), the Open Inference Protocol under /v2 (inference_protocol), a request's
deadline, admission, submitting and collecting its jobs (submit), the API's document and docs
(api_docs), gunicorn's gevent worker with arrival times and paced bodies (gevent_worker,
gunicorn.conf.py), and the page at / (static/). It never imports a deep learning framework."""
