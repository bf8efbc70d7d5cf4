"""The DPO loss and step: closed form, equality with TRL's DPOTrainer, and learning on a fixed batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.dpo import DPOConfig, DPOLearnerCore, dpo_loss, sequence_logprobs, tokenize_pairs
from qrloop.models import build_tiny_policy, load_policy, require_policy
from qrloop.settings import Settings

PAIRS = [
    ("angle bracket", "metal angle bracket", "angle"),
    ("toungh groove", "tongue and groove boards", "groove music"),
    ("cordless drill", "20v cordless drill driver kit", "drill"),
    ("paint storage contaiers", "paint storage containers", "paint it black"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny"), require_policy(Settings()), seed=0)


def core_for(tiny_dir: Path, **config: float) -> DPOLearnerCore:
    model, tokenizer = load_policy(tiny_dir)
    tokenizer.padding_side = "right"
    return DPOLearnerCore.from_model(model, tokenizer, DPOConfig(**config))  # type: ignore[arg-type]


def test_loss_closed_form() -> None:
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -2.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # logits: 0.5*((0.5) - (-0.5)) = 0.5 and 0.5*((0) - (0.5)) = -0.25
    expected = (
        -(
            torch.nn.functional.logsigmoid(torch.tensor(0.5))
            + torch.nn.functional.logsigmoid(torch.tensor(-0.25))
        )
        / 2
    )
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-6)
    assert out.margin == pytest.approx((0.5 + -0.25) / 2, abs=1e-6)
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.25, 0.0]))
    assert torch.allclose(out.rejected_rewards, torch.tensor([-0.25, 0.25]))


def test_completion_mask_covers_the_rewrite_and_eos(tiny_dir: Path) -> None:
    _, tokenizer = load_policy(tiny_dir)
    batch = tokenize_pairs(tokenizer, PAIRS[:1])
    completion = batch["input_ids"][0][batch["completion_mask"][0].bool()]
    assert tokenizer.decode(completion) == "metal angle bracket" + tokenizer.eos_token
    assert batch["input_ids"].shape[0] == 2, "chosen then rejected"


def test_equals_trl_dpo_trainer_loss(tiny_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from qrloop.prompting import build_prompt

    core = core_for(tiny_dir, beta=0.1)
    ours, _ = core.loss_on(PAIRS)

    model, tokenizer = load_policy(tiny_dir)
    tokenizer.padding_side = "right"
    reference, _ = load_policy(tiny_dir)
    data = Dataset.from_list(
        [{"prompt": build_prompt(tokenizer, q), "chosen": c, "rejected": r} for q, c, r in PAIRS]
    )
    args = TRLConfig(
        output_dir=str(tmp_path),
        beta=0.1,
        loss_type=["sigmoid"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=len(PAIRS),
        max_length=None,
        dataset_num_proc=None,
        logging_strategy="no",
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
    assert float(ours.loss.detach()) == pytest.approx(float(theirs), abs=1e-4)


def test_steps_raise_the_margin_and_leave_the_reference_frozen(tiny_dir: Path) -> None:
    core = core_for(tiny_dir, beta=0.1, learning_rate=1e-3)
    reference_before = [p.detach().clone() for p in core.reference.parameters()]
    policy_before = [p.detach().clone() for p in core.policy.parameters()]
    first = core.step(PAIRS)
    for _ in range(5):
        last = core.step(PAIRS)
    assert last.margin > first.margin + 0.05
    assert last.loss < first.loss
    assert all(torch.equal(a, b) for a, b in zip(reference_before, core.reference.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(policy_before, core.policy.parameters(), strict=True))


def test_sequence_logprobs_are_nonpositive_and_masked(tiny_dir: Path) -> None:
    core = core_for(tiny_dir)
    batch = tokenize_pairs(core.tokenizer, PAIRS)
    with torch.no_grad():
        chosen, rejected = sequence_logprobs(core.policy, batch)
    assert chosen.shape == rejected.shape == (len(PAIRS),)
    assert bool((chosen < 0).all()) and bool((rejected < 0).all())


def test_optimizer_state_round_trips(tiny_dir: Path) -> None:
    core = core_for(tiny_dir, learning_rate=1e-3)
    core.step(PAIRS)
    state = core.optimizer.state_dict()
    other = core_for(tiny_dir, learning_rate=1e-3)
    other.optimizer.load_state_dict(state)
    assert other.optimizer.state_dict()["state"].keys() == state["state"].keys()
