"""Celery workers that run sanitize jobs (`celery -A workers.app worker`)."""
