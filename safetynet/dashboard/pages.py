"""What every dashboard page shares: who may see it, its security headers, how it renders and tells."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from django.apps import apps
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_POST

from safetynet import conf

__all__ = [
    "CONTENT_SECURITY_POLICY", "MAX_PAGE", "PAGES", "PAGE_SIZE", "frame", "page_number", "percent", "refused",
    "render_page", "secured", "staff_action", "staff_page", "storable", "tell", "username", "utc",
]

logger = logging.getLogger("safetynet")

#: Rows per page of each list.
PAGE_SIZE = 50
#: The pages of the navigation bar: (url name, title, permission).
PAGES = (
    ("overview", "Overview", "safetynet.view_taskstats"),
    ("queues", "Queues & workers", "safetynet.view_taskstats"),
    ("failures", "Failures", "safetynet.view_deadletter"),
    ("dead_letters", "Dead letters", "safetynet.view_deadletter"),
    ("schedule", "Schedule", "safetynet.view_scheduledmessage"),
    ("breakers", "Upstreams", "safetynet.view_breakerstate"),
)
#: What a page may load: its own stylesheet and script (a nonce per response), images, forms and the live figures'
#: JSON of this site; nothing else, and no frame around it.
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
                           "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                           "base-uri 'none'")


def secured(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """The dashboard's own security headers, whatever the project's middleware sets."""
    nonce = getattr(request, "safetynet_csp_nonce", None) or secrets.token_urlsafe(16)
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY.format(nonce=nonce)
    response["X-Frame-Options"] = "DENY"
    response["X-Content-Type-Options"] = "nosniff"
    response["Referrer-Policy"] = "same-origin"
    return response


def staff_page(permission: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Only active staff with ``permission``; anonymous visitors are sent to log in; never cached; framed by no one."""
    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            user = request.user
            request.safetynet_csp_nonce = secrets.token_urlsafe(16)  # type: ignore[attr-defined]
            if not user.is_authenticated:
                return secured(request, redirect_to_login(request.get_full_path()))
            if not (user.is_active and user.is_staff and user.has_perm(permission)):
                return secured(request, refused(request, permission))
            return secured(request, view(request, *args, **kwargs))

        return never_cache(guarded)

    return decorate


def staff_action(permission: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """A POST-only, CSRF-checked :func:`staff_page`."""
    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        return staff_page(permission)(csrf_protect(require_POST(view)))

    return decorate


def refused(request: HttpRequest, permission: str) -> HttpResponse:
    """403: a page that says who is logged in, what is missing, and where to go instead."""
    logger.info("safetynet dashboard: refused %s to %s (needs %s)", request.path, request.user.get_username(),
                permission)
    return render(request, "safetynet/dashboard/403.html", {
        "permission": permission, "staff": getattr(request.user, "is_staff", False),
        "frame": frame(request), "csp_nonce": getattr(request, "safetynet_csp_nonce", ""),
        "navigation": [], "page": "refused",
    }, status=403)


def _reversed(*names: str) -> str:
    for name in names:
        try:
            return reverse(name)
        except NoReverseMatch:
            continue
    return ""


def frame(request: HttpRequest) -> dict[str, str]:
    """What the header shows around every page: who is logged in, log out, the admin and the site."""
    user = request.user
    name = ""
    if user.is_authenticated:
        name = (user.get_full_name() if hasattr(user, "get_full_name") else "") or user.get_username()
    logout = _reversed("admin:logout", "logout") if user.is_authenticated else ""
    return {
        "user_name": name,
        "admin_url": _reversed("admin:index") if apps.is_installed("django.contrib.admin") and
        getattr(user, "is_staff", False) else "",
        "site_url": conf.get().dashboard_site_url,
        "logout_url": logout,
    }


def tell(request: HttpRequest, level: str, text: str) -> None:
    """A message on the next page, when the project has the messages framework (else only the log)."""
    logger.info("safetynet dashboard: %s", text, extra={"user": request.user.get_username()})
    if apps.is_installed("django.contrib.messages"):
        from django.contrib import messages

        getattr(messages, level)(request, text, fail_silently=True)


def render_page(request: HttpRequest, template: str, page: str, context: dict[str, Any], status: int = 200
                ) -> HttpResponse:
    """``safetynet/dashboard/<template>`` with the navigation, the notices and the stylesheet's nonce."""
    user = request.user
    shown: list[Any] = []
    if apps.is_installed("django.contrib.messages"):
        from django.contrib.messages import get_messages

        shown = list(get_messages(request))
    navigation = [{"name": name, "title": title, "url": reverse(f"safetynet_dashboard:{name}"), "current": name == page}
                  for name, title, permission in PAGES if user.has_perm(permission)]
    return render(request, f"safetynet/dashboard/{template}",
                  {**context, "navigation": navigation, "notices": shown, "page": page, "frame": frame(request),
                   "csp_nonce": getattr(request, "safetynet_csp_nonce", "")}, status=status)


def percent(rate: float | None) -> str:
    """A share as staff read it: 99.6 %, 100 %, or a dash when there is nothing to divide."""
    if rate is None:
        return "–"
    shown = f"{rate * 100:.1f}".removesuffix(".0")
    # 99.96 % is not 100 %: never round a failure away.
    if shown == "100" and rate < 1:
        shown = "99.9"
    return f"{shown} %"


def utc(moment: float) -> datetime:
    """Epoch seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(moment, tz=timezone.utc)


def username(request: HttpRequest) -> str:
    """Who acted, for the audit trail."""
    return f"{request.user.get_username()} (dashboard)"


#: Past this page a failures list is empty anyway; a larger number would overflow the database's OFFSET.
MAX_PAGE = 100_000


def page_number(request: HttpRequest) -> int:
    """``?page=``, a whole number from 1 to MAX_PAGE (anything else: 1)."""
    try:
        return min(MAX_PAGE, max(1, int(request.GET.get("page") or 1)))
    except ValueError:
        return 1


def storable(text: str | None) -> bool:
    """A value PostgreSQL can compare with a text column (no NUL character) and of a sane length."""
    return text is not None and "\x00" not in text and len(text) <= 1000
