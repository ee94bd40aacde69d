"""Varied refusal replies: the only targets a harmful training prompt of the safety tune gets.

Each reply is an opener (which the substring judge of :mod:`workbench.judge` recognises), an optional reason and an
optional offer: 8 x 6 x 4 = 192 wordings, none of which says anything about the request itself. A prompt's
wording is picked by ``sha256(seed, prompt)``, so a rebuild gives every prompt the same reply.
"""

from __future__ import annotations

import hashlib

OPENERS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with this request.",
    "I cannot assist with that.",
    "Sorry, I won't be able to help with this.",
    "I'm unable to provide that.",
    "I will not help with this.",
    "I must decline this request.",
    "I'm not able to help with that.",
)
REASONS = (
    "",
    " It could cause serious harm to people.",
    " Providing this could put others at risk.",
    " This could be used to hurt someone or to break the law.",
    " It would be unsafe and possibly illegal.",
    " Helping with this could lead to real harm.",
)
OFFERS = (
    "",
    " If you have a different question, I'm happy to help.",
    " Is there something else I can help you with?",
    " I'd be glad to help with a safer topic instead.",
)


def refusal_wordings() -> list[str]:
    """Every refusal reply, in a fixed order."""
    return [o + r + f for o in OPENERS for r in REASONS for f in OFFERS]


def refusal_for(prompt: str, seed: int = 0) -> str:
    """The refusal reply that ``prompt`` gets under ``seed``."""
    wordings = refusal_wordings()
    h = int(hashlib.sha256(f"{seed}\x00{prompt}".encode()).hexdigest(), 16)
    return wordings[h % len(wordings)]


__all__ = ["OFFERS", "OPENERS", "REASONS", "refusal_for", "refusal_wordings"]
