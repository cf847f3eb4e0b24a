"""The Celery app of ``bench/dashboard.py``'s worker: a plain app on the bench's broker, so the queues page
has a worker to ask (``celery -A _dashboard_worker worker``, with bench/ on PYTHONPATH)."""

import os

from celery import Celery

app = Celery("bench_dashboard", broker=os.environ.get("SAFETYNET_BENCH_BROKER", "redis://127.0.0.1:6379/9"))
app.conf.task_default_queue = "bench-dashboard"
