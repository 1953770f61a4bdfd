"""Reporting: the report assembled from the stages, its figure, its page, its files."""
