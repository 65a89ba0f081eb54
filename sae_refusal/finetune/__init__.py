"""Refusal-token fine-tuning recipe and the ambiguous-prompt synthesis loop."""
