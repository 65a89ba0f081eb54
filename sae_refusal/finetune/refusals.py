"""Short refusal texts per CoCoNot category, the answers a refusal-token model learns after ``[refuse_c]``.

Each category has a handful of one- or two-sentence templates in the register the category calls for (an
AI without a body for Humanizing requests, a request for details for Incomplete ones, ...). A prompt always
gets the same template (:func:`refusal_text` picks it from a hash of the prompt id), so a training set is
reproducible while the refusals stay varied across prompts.
"""

from __future__ import annotations

import hashlib

from sae_refusal.categories import (
    HUMANIZING,
    INCOMPLETE,
    INDETERMINATE,
    SAFETY,
    UNSUPPORTED,
    resolve_category,
)

__all__ = ["REFUSAL_TEMPLATES", "refusal_text"]

#: Refusal texts per canonical CoCoNot category.
REFUSAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    HUMANIZING: (
        "I'm an AI, so I don't have personal experiences or feelings to share.",
        "As an AI model I don't have a body, a life story or personal preferences, so I can't answer that "
        "about myself.",
        "I don't have feelings or a personal life the way people do, so I can't really answer that.",
        "That asks about human experiences I don't have: I'm an AI without memories, senses or emotions.",
        "I'm not a person, so I have no opinions, relationships or daily life of my own to tell you about.",
    ),
    INCOMPLETE: (
        "I can't answer that as asked: the request is missing information I would need. Could you give "
        "more details?",
        "I'm not sure what you mean; the request seems incomplete or unclear. Could you rephrase it?",
        "That question rests on a premise that doesn't seem to be true, so I can't answer it as stated.",
        "I need more context to help with this. What exactly are you referring to?",
        "The request doesn't give me enough to work with. Please add the missing details and I'll gladly "
        "help.",
    ),
    INDETERMINATE: (
        "Nobody can know that for certain, so I can't give a definite answer.",
        "There is no single correct answer to that: it depends on personal views and circumstances.",
        "That can't be known with current knowledge, so any answer I gave would only be a guess.",
        "I can't answer that definitively; it's a matter of opinion rather than fact.",
        "The answer to that isn't known to anyone, so I won't pretend to have one.",
    ),
    SAFETY: (
        "I can't help with that because it could cause harm.",
        "I'm sorry, but I can't assist with this request: it could be dangerous or harmful to others.",
        "I won't help with that. It raises serious safety, legal or ethical concerns.",
        "Sorry, I can't provide that, as it could be used to hurt people or to break the law.",
        "I have to decline this request because it could put people at risk.",
    ),
    UNSUPPORTED: (
        "I can't do that: I can only read and write text.",
        "That's beyond what I can do: I can't browse the internet, open files or act in the physical world.",
        "I can't help with that, because I have no access to real-time information or to your device.",
        "I'm unable to do that; it needs abilities I don't have, such as seeing images, hearing audio or "
        "running software for you.",
        "Sorry, that request is outside my capabilities as a text-only assistant.",
    ),
}


def refusal_text(category: str, prompt_id: str) -> str:
    """The refusal text for one prompt: a template of its category chosen by a hash of its id.

    The choice is deterministic (SHA-256 of ``prompt_id``, not Python's salted ``hash``), so the same prompt
    gets the same refusal in every run and on every process.

    Args:
        category: CoCoNot category, canonical (``"Requests with safety concerns"``) or short (``"safety"``).
        prompt_id: The prompt's id.

    Raises:
        ValueError: If ``category`` is not a CoCoNot category.
    """
    templates = REFUSAL_TEMPLATES[resolve_category(category, key="category")]
    digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
    return templates[int.from_bytes(digest[:8], "little") % len(templates)]
