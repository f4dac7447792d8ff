"""The project's URLs: the jobs app, from the site's root (the page is ``/``)."""

from django.urls import include, path

urlpatterns = [path("", include("jobs.urls"))]
