"""The classic cases, each written the way people write Celery tasks, under ``@safetynet.task``."""

import json
import smtplib
import socket
import urllib.request
from email.message import EmailMessage

from django.conf import settings

import safetynet
from shop.models import Order, Payment


# (a) The Celery docs' retry example: bind=True, max_retries=3, raise self.retry(exc=..., countdown=...).
@safetynet.task(bind=True, max_retries=3)
def send_welcome_email(self, to):
    """Send a welcome email through the SMTP server; a 4xx answer means try again later."""
    message = EmailMessage()
    message["From"] = "hello@shop.example"
    message["To"] = to
    message["Subject"] = "Welcome!"
    message.set_content("Thanks for signing up.")
    try:
        with smtplib.SMTP(settings.DEMO_SMTP_HOST, settings.DEMO_SMTP_PORT, timeout=5) as smtp:
            smtp.send_message(message)
    except smtplib.SMTPException as exc:
        raise self.retry(exc=exc, countdown=2)
    return f"welcome email sent to {to}"


# (b) An HTTP API with rate limiting: classified by status, Retry-After honoured.
@safetynet.task(
    retry_policy=safetynet.RetryPolicy(
        max_attempts=4, backoff=safetynet.Exponential(base=1, factor=2), jitter="full", max_delay=30
    ),
    retry_on=[safetynet.http_status(429, 503)],
)
def fetch_exchange_rate(currency):
    """GET the rate of ``currency``; urllib raises HTTPError for a 429."""
    with urllib.request.urlopen(f"{settings.DEMO_API_URL}/rates/{currency}", timeout=5) as response:
        return json.load(response)


# (c) A permanent error: no retry can make a missing order exist.
@safetynet.task
def charge_order(order_id):
    """Charge an order; it must exist."""
    try:
        order = Order.objects.get(pk=order_id)
    except Order.DoesNotExist:
        raise safetynet.Permanent(f"order {order_id} does not exist") from None
    return f"charged {order.total_cents} cents to {order.customer}"


# (d) Celery's autoretry options, unchanged: the service is down for good, retries run out.
@safetynet.task(autoretry_for=(ConnectionError,), retry_backoff=True, retry_backoff_max=4, max_retries=3)
def sync_inventory(warehouse):
    """Push stock levels to the inventory service (nothing listens there: connection refused)."""
    host, port = settings.DEMO_INVENTORY_ADDRESS.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(f"SYNC {warehouse}\n".encode())
    return f"inventory of {warehouse} synced"


# (e) A payment: the gateway charges, then answers too late. The retry sends the same
# Idempotency-Key, so the gateway returns the first charge instead of charging again; the
# ledger row and the "succeeded" mark commit together, once. A second message for the same
# order (a double click) waits for the first and gets its stored result.
@safetynet.task(
    bind=True,
    idempotency_key="pay-order-{order_id}",
    retry_policy=safetynet.RetryPolicy(max_attempts=4, backoff=safetynet.Fixed(1), jitter="none"),
)
def pay_order(self, order_id, amount_cents):
    """Charge ``amount_cents`` for ``order_id`` at the payment gateway and write the ledger row."""
    request = urllib.request.Request(
        f"{settings.DEMO_GATEWAY_URL}/charges",
        data=json.dumps({"order_id": order_id, "amount_cents": amount_cents}).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": self.idempotency_key},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=1) as response:  # a timeout is transient by default
        charge = json.load(response)
    Payment.objects.create(order_id=order_id, charge_id=charge["id"], amount_cents=amount_cents,
                           task_id=self.request.id)
    return charge["id"]


# (g) A long wait: the partner's API says "come back in an hour" (429, Retry-After: 3600). The
# retry waits in the database (the durable schedule), not in a worker's memory as an ETA message.
@safetynet.task(
    retry_policy=safetynet.RetryPolicy(max_attempts=3, backoff=60, jitter="none", max_delay=7200),
    retry_on=[safetynet.http_status(429, 503)],
)
def export_report(report_id):
    """Send a report to the partner's API."""
    with urllib.request.urlopen(f"{settings.DEMO_PARTNER_URL}/exports/{report_id}", timeout=5) as response:
        return json.load(response)


# (i) A limit shared by every worker (SAFETYNET["LIMITS"]["quotes-api"]: 2 at once, 5 a second). A task over it
# is deferred until its turn (a snooze: no attempt used, the worker slot free at once), never failed.
@safetynet.task(limit="quotes-api")
def fetch_shipping_quote(parcel):
    """GET a shipping quote for ``parcel`` from the quotes API."""
    with urllib.request.urlopen(f"{settings.DEMO_QUOTES_URL}/quotes/{parcel}", timeout=5) as response:
        return json.load(response)


# -- The user-facing reports (the progress widget on /reports/) --------------------------------

@safetynet.task(bind=True, progress_result=True)
def build_sales_report(self, month):
    """Five steps, each reported to the user who asked; the bar fills, then a check mark."""
    import time

    steps = 5
    for step in range(1, steps + 1):
        self.progress(step - 1, steps, message=f"Adding up the sales of {month}")
        time.sleep(0.6)
    self.progress(steps, steps, message=f"Sales report for {month} is ready")
    # A "url" (and "label") in the result: the widget shows a link to it once done.
    return {"month": month, "rows": 1234, "url": f"/reports/?month={month}", "label": f"See the sales of {month}"}


@safetynet.task(bind=True)
def build_broken_report(self, month):
    """Its template is broken: the user sees the safe message, never this exception's text."""
    import time

    self.progress(1, 4, message=f"Reading {month}")
    time.sleep(0.8)
    raise KeyError("template 'sales.html' has no field 'margin' (db password=demo-secret-42)")


# -- The realistic mix the dashboard shows (run.py sends a batch of these) -------------------------

@safetynet.task
def sync_catalog(item):
    """A chore that just works."""
    return item


@safetynet.task(bind=True, retry_policy=safetynet.RetryPolicy(max_attempts=3, backoff=0.2, jitter="none"),
                retry_on=[ConnectionError])
def notify_customer(self, customer):
    """The mail relay drops every third customer's first attempt: a retry, then a success."""
    if customer % 3 == 0 and self.attempt == 1:
        raise ConnectionError("mail relay closed the connection")
    return customer


@safetynet.task
def import_row(row):
    """Every seventh row of the supplier's file is bad data: a permanent error, at once."""
    if row % 7 == 0:
        raise safetynet.Permanent(f"row {row}: price is not a number")
    return row


def partner_feed_flag():
    """While this file is missing the partner's feed is down (run.py creates it: replays then succeed)."""
    from pathlib import Path

    return Path(settings.VAR_DIR) / "partner-feed-up"


@safetynet.task(bind=True, retry_policy=safetynet.RetryPolicy(max_attempts=2, backoff=0.2, jitter="none"),
                retry_on=[ConnectionError])
def refresh_partner_feed(self, partner):
    """Down during the run: retries exhausted, a dead letter; replayed once the feed is back, it succeeds."""
    if not partner_feed_flag().exists():
        raise ConnectionError(f"partner {partner}: feed.example.com refused the connection")
    return partner


# -- (h) Django's own tasks API (django.tasks, Django 6; or the django-tasks backport on 5.2) ---------------
# settings.TASKS points it at safetynet.tasks.CeleryBackend: the same @task as in Django's docs, run on this
# Celery worker with a retry policy; get_result()/refresh() read its durable record.

try:
    from django.tasks import task as django_task
except ImportError:
    try:
        from django_tasks import task as django_task
    except ImportError:  # Django 5.2 without the backport: the demo runs without (h)
        django_task = None

if django_task is not None and getattr(settings, "TASKS", None):
    @django_task(takes_context=True,
                 retry_policy=safetynet.RetryPolicy(max_attempts=4, backoff=safetynet.Fixed(1), jitter="none"))
    def book_courier(context, parcel):
        """The courier's booking API is busy on the first two attempts (a dropped connection), then books."""
        if context.attempt <= 2:
            raise ConnectionError(f"courier API dropped the connection (attempt {context.attempt}, parcel {parcel})")
        return {"parcel": parcel, "booked_on_attempt": context.attempt}
