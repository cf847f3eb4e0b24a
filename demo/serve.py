#!/usr/bin/env python
"""Serve the demo's pages with a live worker: the dashboard, the reports and their progress bars.

    .venv/bin/python demo/serve.py [--port 8000]

Run ``make demo`` first: it makes the data (demo/var/, or ``SAFETYNET_DEMO_VAR``) and the users
staff and shopper (password ``safetynet-demo``). This starts a Celery worker like the demo's and
Django's development server (``runserver --insecure``, so it serves the static files with
DEBUG off), prints where to look, and stops both on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import run  # the demo's paths, settings module and worker (it puts demo/ on sys.path)


def wait_for_page(url: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise run.DemoError(f"the web server exited (status {server.returncode}) before it answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise run.DemoError(f"the web server did not answer {url} in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    options = parser.parse_args()
    if not (run.VAR_DIR / "demo.sqlite3").exists():
        print(f"no demo data in {run.VAR_DIR}: run `make demo` first", file=sys.stderr)
        return 1
    import django

    django.setup()
    from proj.celery import app

    run.READY_FILE.unlink(missing_ok=True)
    deadline = time.monotonic() + 60
    worker = run.start_worker(app)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(run.DEMO_DIR), str(run.DEMO_DIR.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen([sys.executable, str(run.DEMO_DIR / "manage.py"), "runserver", "--noreload",
                               "--insecure", f"127.0.0.1:{options.port}"], cwd=run.DEMO_DIR, env=env,
                              stdin=subprocess.DEVNULL)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        run.wait_until_ready(worker, deadline)
        wait_for_page(f"http://127.0.0.1:{options.port}/accounts/login/", server, deadline)
        base = f"http://127.0.0.1:{options.port}"
        print(f"serving the demo (worker pid {worker.pid}, its log {run.WORKER_LOG}):\n"
              f"  {base}/safetynet/   the dashboard (staff / {run.USERS['staff']})\n"
              f"  {base}/reports/     a report and its progress bar (shopper / {run.USERS['shopper']})\n"
              "Ctrl-C stops it.", flush=True)
        while not stopping and worker.poll() is None and server.poll() is None:
            time.sleep(0.3)
    except KeyboardInterrupt:
        pass
    except run.DemoError as error:
        print(f"demo/serve.py FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        print(run.stop_worker(worker), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
