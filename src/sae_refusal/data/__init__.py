"""Prompt sets: sources (hub or local files), labels, categories, held-out splits, chat templates."""

from sae_refusal.data.prompt_set import Label, Prompt, PromptSet

__all__ = ["Label", "Prompt", "PromptSet"]
