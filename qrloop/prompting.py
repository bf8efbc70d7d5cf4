"""The one prompt the rewriter samples from and the learner trains on (and the offline SFT uses).

Short on purpose: in a DPO step most tokens were prompt (80% with a long system message), and the step's
cost grows with every token. The chat template is the model's own, so an instruct model sees the format it
was tuned on.
"""

from __future__ import annotations

from typing import Any

SYSTEM = "Rewrite the shopping query for a product search engine. Reply with the query only."


def build_prompt(tokenizer: Any, query: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": query.strip()}]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return f"{SYSTEM}\nQuery: {query.strip()}\nRewrite:"
