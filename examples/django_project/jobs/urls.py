"""The jobs app's URLs: the page, its jobs, and a job run inside one request."""

from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("jobs", views.start_job, name="start-job"),
    path("jobs/run", views.run_job, name="run-job"),
    path("jobs/<str:name>/events", views.job_events, name="job-events"),
    path("jobs/<str:name>/results.ndjson", views.job_results, name="job-results"),
]
