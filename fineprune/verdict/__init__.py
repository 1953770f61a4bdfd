"""Verdict: what a trigger-free scan finds in a model."""
