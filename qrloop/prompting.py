"""The one prompt the rewriter samples from and the learner trains on (and the offline SFT uses).

Short on purpose: in a DPO step most tokens were prompt (80% with a long system message), and the step's
cost grows with every token. The chat template is the model's own, so an instruct model sees the format it
was tuned on.
"""

from __future__ import annotations

from typing import Any

SYSTEM = "Rewrite the shopping query for a product search engine. Reply with the query only."


def build_prompt(tokenizer: Any, query: str) -> str:
    """The templated prompt text, ending where the assistant's rewrite begins."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": query.strip()}]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return f"{SYSTEM}\nQuery: {query.strip()}\nRewrite:"


def end_of_turn(tokenizer: Any, generation_config: Any = None) -> str:
    """The token a rewrite ends with: the one ``generate`` stops on, else the tokenizer's EOS.

    They differ for the converted SmolLM2: its tokenizer reports ``<|im_start|>`` as EOS (a GGUF conversion
    artefact) while its generation config stops on ``<|im_end|>``, the chat template's end of turn. A learner
    that scored rewrites ending in the tokenizer's EOS would train a terminator the rewriter never samples.
    """
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        return str(tokenizer.eos_token)
    return str(tokenizer.convert_ids_to_tokens(int(eos)))
