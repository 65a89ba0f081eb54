"""Evaluation: refusal-token reports, respond-bias calibration, the fine-tuning report callback and eval jobs.

Submodules are imported where used; this package imports nothing eagerly.
"""
