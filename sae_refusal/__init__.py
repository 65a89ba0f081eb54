"""sae_refusal: interpret, steer and patch category-specific refusal in chat LLMs.

Stages (one direction, see docs/ARCHITECTURE.md):
``data`` -> ``llm`` -> ``activations`` -> ``sae`` -> (features, steer, eval) -> ``cli``.
"""

__version__ = "0.1.0"
