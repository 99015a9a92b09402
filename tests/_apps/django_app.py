"""A Django app configured the way its users configure one, for tests/test_real_apps.py.

Django's CSRF middleware on (every POST needs the form's ``csrfmiddlewaretoken`` and, from a browser,
an Origin Django trusts: its own scheme and Host, or one listed in ``CSRF_TRUSTED_ORIGINS``),
``ALLOWED_HOSTS`` and ``CSRF_TRUSTED_ORIGINS`` read from the environment as a deployment sets them,
``DEBUG`` off. Served by uvicorn (Django's documented ASGI deployment; uvicorn is the gateway's own
server, so no other package is needed):

    DJANGO_ALLOWED_HOSTS=app.example.com DJANGO_CSRF_TRUSTED_ORIGINS=https://app.example.com \\
        python -m uvicorn --app-dir tests/_apps django_app:application --port 9000

``django.security`` and ``django.request`` log to stderr, so a refused request says why.
"""

from __future__ import annotations

import os
import secrets

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.urls import path


def _listed(name: str) -> list[str]:
    return [item for item in os.environ.get(name, "").split(",") if item]


settings.configure(
    DEBUG=False,
    SECRET_KEY=secrets.token_urlsafe(32),
    ALLOWED_HOSTS=_listed("DJANGO_ALLOWED_HOSTS"),
    CSRF_TRUSTED_ORIGINS=_listed("DJANGO_CSRF_TRUSTED_ORIGINS"),
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
    ],
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
    USE_TZ=True,
    LOGGING={
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"class": "logging.StreamHandler"}},
        "loggers": {
            "django.security": {"handlers": ["stderr"], "level": "INFO"},
            "django.request": {"handlers": ["stderr"], "level": "INFO"},
        },
    },
)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Django behind the sidecar</title></head>
<body>
<p>user: <span id="user">{{ user }}</span></p>
<p>host: <span id="host">{{ host }}</span></p>
<p>absolute URL: <span id="absolute">{{ absolute }}</span></p>
<form method="post" action="/notes">{% csrf_token %}
  <input name="text" id="text"><button id="save" type="submit">Save</button>
</form>
</body></html>
"""
SAVED = """<!doctype html>
<html><head><meta charset="utf-8"><title>Saved</title></head>
<body><p id="saved">saved {{ text }} for {{ user }}</p></body></html>
"""


def page(request: HttpRequest) -> HttpResponse:
    template = engines["django"].from_string(PAGE)
    return HttpResponse(template.render({
        "user": request.headers.get("X-Auth-User", ""), "host": request.get_host(),
        "absolute": request.build_absolute_uri("/notes"),
    }, request))


def notes(request: HttpRequest) -> HttpResponse:  # CsrfViewMiddleware has checked the POST already
    template = engines["django"].from_string(SAVED)
    return HttpResponse(template.render({
        "text": request.POST.get("text", ""), "user": request.headers.get("X-Auth-User", ""),
    }, request))


urlpatterns = [path("", page), path("notes", notes)]
application = get_asgi_application()
