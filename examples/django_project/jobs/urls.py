"""The jobs app's URLs."""

from django.urls import path

from . import views

urlpatterns = [path("run", views.run_job, name="run-job")]
