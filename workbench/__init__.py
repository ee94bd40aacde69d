"""workbench: mechanistic interpretability of refusal in chat models.

Quick start::

    import workbench as wb
    model = wb.load_model()                      # the committed model organism
    ev = wb.evaluate_refusal(model, wb.organism_splits("test"))
    ev.summary()["refusal_rate"]
"""

from .chat import ChatBatch, format_prompts, post_instruction_positions, tokenize_chat
from .data import organism_prompts, organism_splits
from .errors import WorkbenchError
from .evaluate import Evaluation, evaluate_refusal
from .generation import generate
from .judge import is_refusal, refusal_rate, refusal_score, refusal_token_ids
from .models import DEFAULT_MODEL, fingerprint, load_model, load_tokenizer
from .promptsets import PromptSets, load_data

__version__ = "0.1.0"

__all__ = [
    "ChatBatch", "DEFAULT_MODEL", "Evaluation", "PromptSets", "WorkbenchError", "evaluate_refusal", "fingerprint",
    "format_prompts", "generate", "is_refusal", "load_data", "load_model", "load_tokenizer", "organism_prompts",
    "organism_splits", "post_instruction_positions", "refusal_rate", "refusal_score", "refusal_token_ids",
    "tokenize_chat",
]
