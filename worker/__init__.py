"""Letterpress GPU workers: Celery tasks, the warm pipeline runner, maintenance."""
