"""The demo's Celery app: ``celery -A proj worker`` (with demo/ on PYTHONPATH)."""

import os
import signal
import threading
import time
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def announce_ready(**kwargs):
    """Tell run.py the worker consumes: it waits for this file (no broadcast needed)."""
    from django.conf import settings

    Path(settings.DEMO_WORKER_READY_FILE).write_text(str(os.getpid()))
    parent = os.environ.get("DEMO_PARENT_PID")
    if parent:
        threading.Thread(target=_stop_when_orphaned, args=(int(parent),), daemon=True).start()


def _stop_when_orphaned(parent: int) -> None:
    """If run.py is killed outright, stop too rather than eat the next run's tasks."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
