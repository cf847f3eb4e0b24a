"""The staff dashboard: what fails, since when, how often it retries, what is dead and why, which upstream is down.

Include it in a project's URLs (``path("safetynet/", include("safetynet.dashboard.urls"))``). Every
page is for staff with the model permission it names (see ``views``); every action is a POST
with Django's CSRF check. The numbers come from ``safetynet.stats`` (aggregates the workers flush
in batches) and the dead-letter, schedule and breaker stores; nothing here needs Prometheus.
"""
