"""The classic cases, each written the way people write Celery tasks, under ``@safetynet.task``."""

import json
import smtplib
import socket
import urllib.request
from email.message import EmailMessage

from django.conf import settings

import safetynet
from shop.models import Order


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
