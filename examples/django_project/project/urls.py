"""The project's URLs: the jobs app."""

from django.urls import include, path

urlpatterns = [path("jobs/", include("jobs.urls"))]
