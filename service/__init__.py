"""The REST API (FastAPI): accepts jobs, serves their state and results."""
