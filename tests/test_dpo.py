"""The DPO loss and step: closed form, equality with TRL's DPOTrainer, learning on a fixed batch, resuming."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from learner.dpo import (
    DPOConfig,
    DPOLearnerCore,
    DPOLoss,
    StepStats,
    chunk_spans,
    dpo_loss,
    prompt_tree,
    reference_chunks,
    sequence_logprobs,
    tokenize_pairs,
    tree_logprobs,
)
from qrloop.models import build_tiny_policy, load_policy, policy_dir
from qrloop.prompting import end_of_turn
from qrloop.settings import DPOSettings, Settings

PAIRS = [
    ("angle bracket", "metal angle bracket", "angle"),
    ("toungh groove", "tongue and groove boards", "groove music"),
    ("cordless drill", "20v cordless drill driver kit", "drill"),
    ("paint storage contaiers", "paint storage containers", "paint it black"),
]
END = "<|im_end|>"  # what generate() stops on for SmolLM2 (its generation config's eos)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's matmuls are microseconds; on a shared 2-core machine, waking a second OpenMP thread
    costs more than that (20× slower steps under load), so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny-policy"), policy_dir(Settings()), seed=0)


def core_for(tiny_dir: Path, **config: Any) -> DPOLearnerCore:
    model, tokenizer = load_policy(tiny_dir)
    return DPOLearnerCore.from_model(model, tokenizer, DPOConfig(**config))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the loss ------------------------------------------------------------------------------------------------


def test_loss_closed_form() -> None:
    pc = torch.tensor([-3.0, -5.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -2.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # z = β((pc − rc) − (pr − rr)): 0.5·(0.5 − (−0.5)) = 0.5 and 0.5·(0 − 0.5) = −0.25
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(0.25)))) / 2
    assert float(out.loss.detach()) == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.25, 0.0]))
    assert torch.allclose(out.rejected_rewards, torch.tensor([-0.25, 0.25]))
    assert torch.allclose(out.margin, torch.tensor([0.5, -0.25]))
    # dL/dpc_i = −β σ(−z_i) / B
    out.loss.backward()
    sig = torch.sigmoid(-torch.tensor([0.5, -0.25]))
    assert pc.grad is not None and torch.allclose(pc.grad, -0.5 * sig / 2)


def test_with_a_uniform_reference_it_is_the_papers_eq_2() -> None:
    pc, pr = torch.tensor([-3.0, -7.0, -1.0]), torch.tensor([-4.0, -2.0, -1.5])
    zero = torch.zeros(3)
    eq2 = -F.logsigmoid(0.1 * (pc - pr)).mean()  # −1/B Σ log σ(β log π(Q⁺|Q)/π(Q⁻|Q))
    assert float(dpo_loss(pc, pr, zero, zero, beta=0.1).loss) == pytest.approx(float(eq2), abs=1e-7)
    # A reference that scores a pair's two rewrites alike leaves eq. 2 unchanged.
    ref = torch.tensor([-1.0, 2.0, 0.5])
    assert float(dpo_loss(pc, pr, ref, ref, beta=0.1).loss) == pytest.approx(float(eq2), abs=1e-7)


def test_config_defaults_come_from_the_settings() -> None:
    config, settings = DPOConfig(), DPOSettings()
    assert (config.beta, config.learning_rate, config.max_grad_norm) == (
        settings.beta,
        settings.learning_rate,
        settings.max_grad_norm,
    )
    tuned = DPOConfig.from_settings(DPOSettings(beta=0.3, learning_rate=1e-4), lora_r=8)
    assert (tuned.beta, tuned.learning_rate, tuned.lora_r) == (0.3, 1e-4, 8)
    # The learner lays its steps out as a prompt tree unless the setting says otherwise.
    assert config.prompt_tree and settings.prompt_tree
    assert not DPOConfig.from_settings(DPOSettings(prompt_tree=False)).prompt_tree
    # LD-DPO is off unless asked for, and cannot be combined with RPO (each redefines the chosen likelihood).
    assert config.ld_alpha is None and DPOConfig.from_settings(DPOSettings(ld_alpha=0.5)).ld_alpha == 0.5
    assert "LD-DPO" not in config.loss_summary()
    summary = DPOConfig(beta=0.1, learning_rate=1e-3, ld_alpha=0.3, lora_r=16).loss_summary()
    assert summary == "DPO β 0.1, lr 0.001, LoRA r 16, LD-DPO α 0.3"
    with pytest.raises(ValueError, match="cannot be combined"):
        DPOConfig(rpo_alpha=1.0, ld_alpha=0.5)
    with pytest.raises(ValueError):
        DPOSettings(ld_alpha=1.5)


# -- tokenisation and log-probs ------------------------------------------------------------------------------


def test_batch_layout_and_completion_mask(tiny_dir: Path) -> None:
    model, tokenizer = load_policy(tiny_dir)
    assert tokenizer.padding_side == "left", "the rewriter's setting; the learner must not depend on it"
    assert end_of_turn(tokenizer, model.generation_config) == END != tokenizer.eos_token
    batch = tokenize_pairs(tokenizer, PAIRS, eos_token=END)
    n = len(PAIRS)
    assert batch["input_ids"].shape[0] == 2 * n
    completions = [
        tokenizer.decode(ids[mask.bool()])
        for ids, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True)
    ]
    assert completions == [c + END for _, c, _ in PAIRS] + [r + END for _, _, r in PAIRS]
    # Right padding: every row's real tokens start at 0, masks are prefixes, completion ⊆ attention.
    lengths = batch["attention_mask"].sum(dim=1)
    for i, length in enumerate(lengths.tolist()):
        assert batch["attention_mask"][i, :length].all() and not batch["attention_mask"][i, length:].any()
    assert bool((batch["completion_mask"] <= batch["attention_mask"]).all())
    # The prompt is shared by a pair's two rows.
    prompt_len = int(batch["completion_mask"][0].argmax())
    assert torch.equal(batch["input_ids"][0, :prompt_len], batch["input_ids"][n, :prompt_len])
    # max_len keeps the start of each row.
    cut = tokenize_pairs(tokenizer, PAIRS, max_len=prompt_len + 2, eos_token=END)
    assert cut["input_ids"].shape[1] == prompt_len + 2
    assert int(cut["completion_mask"][0].sum()) == 2


def test_sequence_logprobs_equal_a_full_log_softmax(tiny_dir: Path) -> None:
    model, tokenizer = load_policy(tiny_dir)
    batch = tokenize_pairs(tokenizer, PAIRS, eos_token=END)
    with torch.no_grad():
        chosen, rejected = sequence_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    naive = (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)
    assert chosen.shape == rejected.shape == (len(PAIRS),)
    assert torch.allclose(torch.cat([chosen, rejected]), naive, atol=1e-5)
    assert bool((naive < 0).all())


# -- equality with TRL ---------------------------------------------------------------------------------------


def trl_trainer(tiny_dir: Path, tmp_path: Path, core: DPOLearnerCore, **loss: Any) -> Any:
    """TRL's DPOTrainer on ``PAIRS`` with ``core``'s current weights as the policy, the tiny model as the
    reference, and ``loss`` (loss_type, loss_weights) as its loss."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from qrloop.prompting import build_prompt

    model, tokenizer = load_policy(tiny_dir)
    model.load_state_dict(core.policy.state_dict())
    reference, _ = load_policy(tiny_dir)
    # TRL appends tokenizer.eos_token to plain-text completions; the converted tokenizer's EOS is
    # <|im_start|>, so TRL gets a tokenizer whose EOS is the end of turn the rewriter samples.
    tokenizer.eos_token = END
    rows = [{"prompt": build_prompt(tokenizer, q), "chosen": c, "rejected": r} for q, c, r in PAIRS]
    args = TRLConfig(
        output_dir=str(tmp_path),
        beta=core.config.beta,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=len(PAIRS),
        max_length=core.config.max_length,
        precompute_ref_log_probs=False,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        **loss,
    )
    return DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("prompt_tree", [False, True])
def test_equals_trl_dpo_trainer(tiny_dir: Path, tmp_path: Path, prompt_tree: bool) -> None:
    """Same pairs, same tiny model: identical token ids, loss to 1e-4, same rewards and gradients.

    Compared after two steps, where the policy differs from the reference: at step 0 every DPO loss is log 2
    whatever the log-probabilities, so equality there would prove little. Ours computes each prompt token once
    (``prompt_tree``); TRL runs its concatenated layout: the same numbers must come out."""
    core, batch, ours = loss_after_two_steps(tiny_dir, prompt_tree=prompt_tree)
    assert abs(float(ours.loss.detach()) - math.log(2)) > 1e-3, "the policy must have moved off the reference"

    trainer = trl_trainer(tiny_dir, tmp_path, core, loss_type=["sigmoid"])
    theirs_batch, theirs = trl_loss_with_gradients(trainer)

    # 1. TRL's own tokenisation and collation of the same pairs, in order, is our batch.
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(theirs_batch[key], batch[key]), key

    # 2. TRL's loss on that batch, and its logged rewards.
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()), abs=1e-4)
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(float(ours.chosen_rewards.mean()), abs=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx(float(ours.rejected_rewards.mean()), abs=1e-5)
    assert metrics["rewards/margins"][-1] == pytest.approx(float(ours.margin.mean()), abs=1e-5)

    # 3. The gradients, parameter by parameter (so a step with the same optimizer is the same step).
    assert assert_same_gradients(core, trainer) == len(dict(trainer.model.named_parameters()))


def loss_after_two_steps(
    tiny_dir: Path, **config: Any
) -> tuple[DPOLearnerCore, dict[str, torch.Tensor], DPOLoss]:
    """A core two steps off its reference (at step 0 every DPO loss is log 2, which proves little), the batch
    of ``PAIRS`` and its loss, with the policy's gradients of that loss."""
    core = core_for(tiny_dir, beta=0.1, learning_rate=1e-3, **config)
    core.step(PAIRS)
    core.step(PAIRS)
    batch = core.tokenize(PAIRS)
    core.optimizer.zero_grad(set_to_none=True)
    ours = core.loss(batch)
    ours.loss.backward()
    return core, batch, ours


def trl_loss_with_gradients(trainer: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """TRL's collation of ``PAIRS`` and its loss on it, with its model's gradients of that loss."""
    theirs_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.zero_grad(set_to_none=True)
    theirs = trainer.compute_loss(trainer.model, theirs_batch)
    theirs.backward()
    return theirs_batch, theirs


def assert_same_gradients(core: DPOLearnerCore, trainer: Any) -> int:
    """Every parameter of ours has TRL's gradient (to float rounding); returns how many were compared."""
    their_grads = dict(trainer.model.named_parameters())
    compared = 0
    for name, param in core.policy.named_parameters():
        other = their_grads[name].grad
        assert param.grad is not None and other is not None, name
        assert torch.allclose(param.grad, other, rtol=1e-4, atol=1e-7), name
        compared += 1
    return compared


# -- learning ------------------------------------------------------------------------------------------------


def test_steps_raise_the_margin_and_leave_the_reference_frozen(tiny_dir: Path) -> None:
    core = core_for(tiny_dir, beta=0.1, learning_rate=1e-3)
    assert core.reference is not None  # a full fine-tune keeps a frozen reference copy
    reference_before, policy_before = snapshot(core.reference), snapshot(core.policy)
    assert not any(p.requires_grad for p in core.reference.parameters())

    first = core.step(PAIRS)
    # Policy = reference at the start: every implicit reward is 0 and the loss is log 2.
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)
    assert first.margin == pytest.approx(0.0, abs=1e-6)
    assert first.tokens == int(core.tokenize(PAIRS)["attention_mask"].sum()) and first.grad_norm > 0
    for _ in range(5):
        last = core.step(PAIRS)
    assert last.margin > first.margin + 0.05
    assert last.loss < first.loss - 0.01
    assert last.accuracy == 1.0
    assert core.steps == 6

    reference_after, policy_after = snapshot(core.reference), snapshot(core.policy)
    assert all(torch.equal(reference_before[k], reference_after[k]) for k in reference_before)
    assert any(not torch.equal(policy_before[k], policy_after[k]) for k in policy_before)


def test_lora_trains_the_adapter_against_the_disabled_base(tiny_dir: Path) -> None:
    base, tokenizer = load_policy(tiny_dir)
    with torch.no_grad():
        base_logps = torch.cat(sequence_logprobs(base, tokenize_pairs(tokenizer, PAIRS, eos_token=END)))
    core = core_for(tiny_dir, beta=0.1, learning_rate=5e-3, lora_r=4)
    assert core.reference is None
    frozen_before = {n: p.detach().clone() for n, p in core.policy.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in core.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    first = core.step(PAIRS)
    assert first.loss == pytest.approx(math.log(2), abs=1e-6), "a fresh adapter is the identity"
    for _ in range(5):
        last = core.step(PAIRS)
    assert last.margin > first.margin + 0.05

    params = dict(core.policy.named_parameters())
    assert all(torch.equal(frozen_before[n], params[n]) for n in frozen_before)
    ref = torch.cat(core.reference_logprobs(core.tokenize(PAIRS)))
    assert torch.allclose(ref, base_logps, atol=1e-5), "the reference is the base the run started from"


def test_optimizer_state_round_trips(tiny_dir: Path) -> None:
    """A restarted learner with the saved weights and optimizer state takes exactly the step it would have."""
    a = core_for(tiny_dir, learning_rate=1e-3)
    a.step(PAIRS)
    buffer = io.BytesIO()
    torch.save({"weights": a.policy.state_dict(), "core": a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    def restarted(with_state: bool) -> DPOLearnerCore:
        policy, tokenizer = load_policy(tiny_dir)
        policy.load_state_dict(saved["weights"])
        reference, _ = load_policy(tiny_dir)  # the version the run started from
        core = DPOLearnerCore(policy, reference, tokenizer, DPOConfig(learning_rate=1e-3))
        if with_state:
            core.load_state_dict(saved["core"])
        return core

    b, fresh = restarted(True), restarted(False)
    assert b.steps == 1 and fresh.steps == 0
    stats = [core.step(PAIRS) for core in (a, b, fresh)]
    assert stats[0].loss == pytest.approx(stats[1].loss, abs=1e-7)
    after = [snapshot(core.policy) for core in (a, b, fresh)]
    assert all(torch.allclose(after[0][k], after[1][k], rtol=0, atol=1e-7) for k in after[0])
    worst = max(float((after[0][k] - after[2][k]).abs().max()) for k in after[0])
    assert worst > 1e-5, "without the optimizer state the step differs (the test would notice a no-op load)"


# -- the prompt tree: each prompt token computed once -------------------------------------------------------


@pytest.mark.parametrize("max_len", [None, 36])
def test_prompt_tree_gives_the_plain_layouts_logprobs_and_gradients(
    tiny_dir: Path, max_len: int | None
) -> None:
    """The same log-probabilities and gradients as the TRL layout, with fewer tokens through the model;
    36 tokens cuts some rows inside their completion and one pair to no completion at all."""
    model, tokenizer = load_policy(tiny_dir)
    batch = tokenize_pairs(tokenizer, PAIRS, max_len, eos_token=END)
    tree = prompt_tree(batch)
    assert tree.prefix_ids.shape[1] > 20, "the system message is shared by every prompt"
    assert tree.tokens < int(batch["attention_mask"].sum()) / 2

    plain = torch.cat(sequence_logprobs(model, batch))
    plain.sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    shared = torch.cat(tree_logprobs(model, tree))
    shared.sum().backward()
    assert torch.allclose(plain, shared, atol=1e-5)
    for name, param in model.named_parameters():
        assert param.grad is not None
        assert torch.allclose(param.grad, plain_grads[name], rtol=1e-4, atol=1e-6), name


EIGHT_PAIRS = PAIRS + [(query + " set", chosen + " set", rejected) for query, chosen, rejected in PAIRS]


def test_reference_chunks_halve_towards_the_end_of_a_batch_and_repeat_per_batch() -> None:
    assert reference_chunks(16) == [8, 4, 2, 1, 1]
    assert reference_chunks(8) == [4, 2, 1, 1]
    assert reference_chunks(3) == [1, 1, 1] and reference_chunks(1) == [1]
    # Pairs queued past a full batch start the next batch's chunks; a short count still gets its whole span.
    assert chunk_spans(11, 8) == [(0, 4), (4, 6), (6, 7), (7, 8), (8, 12)]
    assert chunk_spans(3, 8, batching=False) == [(0, 1), (1, 2), (2, 3)]


def test_reference_terms_do_not_depend_on_how_the_pairs_arrived(tiny_dir: Path) -> None:
    """The reference terms are computed in chunks fixed by position, so a step is bit-identical whether its
    pairs were prepared one at a time (as the learner does), in polls of 3 and 5, or not at all; and that is
    not luck: the terms of the same pairs in one forward differ in the last bits from the chunked ones."""
    one_by_one, in_polls, lazy = (core_for(tiny_dir, learning_rate=1e-3, batch_size=8) for _ in range(3))
    for arrived in range(1, 9):
        one_by_one.prepare_reference(EIGHT_PAIRS[:arrived])
    in_polls.prepare_reference(EIGHT_PAIRS[:3])
    in_polls.prepare_reference(EIGHT_PAIRS[:8])
    chunked = torch.stack([torch.stack(one_by_one._reference_cache[pair]) for pair in EIGHT_PAIRS])
    together = torch.stack(one_by_one.reference_logprobs(one_by_one.tokenize(EIGHT_PAIRS)), dim=1)
    assert torch.allclose(chunked, together, atol=1e-4) and not torch.equal(chunked, together)
    stats = [core.step(EIGHT_PAIRS) for core in (one_by_one, in_polls, lazy)]
    assert not one_by_one._reference_cache, "used terms are dropped"
    assert stats[0].loss == stats[1].loss == stats[2].loss
    weights = [snapshot(core.policy) for core in (one_by_one, in_polls, lazy)]
    assert all(torch.equal(weights[0][k], other[k]) for other in weights[1:] for k in weights[0])


def test_gradient_batching_takes_the_one_pass_step_whatever_the_arrivals(tiny_dir: Path) -> None:
    """The gradient accumulated chunk by chunk as the pairs arrive is the one-pass gradient to float rounding,
    and the step the same bits whether the pairs were prepared one at a time, in polls, or not at all."""
    cores = [core_for(tiny_dir, learning_rate=1e-3, batch_size=8) for _ in range(4)]
    one_by_one, in_polls, _lazy, inspected = cores  # the lazy one is prepared by its step alone
    one_pass = core_for(tiny_dir, learning_rate=1e-3, batch_size=8, gradient_batching=False)
    for arrived in range(1, 9):
        one_by_one.prepare_step(EIGHT_PAIRS[:arrived])
    in_polls.prepare_step(EIGHT_PAIRS[:3])
    in_polls.prepare_step(EIGHT_PAIRS[:8])
    assert one_by_one.trainable_parameters()[0].grad is not None, "the gradient was accumulated ahead"

    inspected.prepare_gradients(EIGHT_PAIRS, final=True)
    one_pass.loss(one_pass.tokenize(EIGHT_PAIRS)).loss.backward()
    for chunked, whole in zip(inspected.trainable_parameters(), one_pass.trainable_parameters(), strict=True):
        assert chunked.grad is not None and whole.grad is not None
        assert torch.allclose(chunked.grad, whole.grad, rtol=1e-4, atol=1e-7)
    one_pass.optimizer.zero_grad(set_to_none=True)

    stats = [core.step(EIGHT_PAIRS) for core in (*cores, one_pass)]
    assert stats[0].loss == stats[1].loss == stats[2].loss == stats[3].loss
    assert stats[0].loss == pytest.approx(stats[4].loss, abs=1e-6)
    assert stats[0].margin == pytest.approx(stats[4].margin, abs=1e-6)
    assert stats[0].grad_norm == pytest.approx(stats[4].grad_norm, rel=1e-4)
    assert stats[0].tokens == stats[4].tokens
    weights = [snapshot(core.policy) for core in cores]
    assert all(torch.equal(weights[0][k], other[k]) for other in weights[1:] for k in weights[0])
    assert all(p.grad is None for p in one_by_one.trainable_parameters()), "nothing is carried to the next"


def test_with_gradient_batching_the_step_computes_only_the_last_pairs_chunk(tiny_dir: Path) -> None:
    core = core_for(tiny_dir, batch_size=8)
    rows: list[int] = []  # rows of each forward of the policy (the reference is a separate model here)
    forward = core.policy.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        rows.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    core.policy.forward = counting  # a spy on the real model
    for arrived in range(1, 8):
        core.prepare_step(EIGHT_PAIRS[:arrived])
    ahead = list(rows)
    # The chunks of 4, 2 and 1 pairs went through the policy as each completed: the shared prefix (one row),
    # the rest of each prompt, the tails (chosen and rejected); a lone pair's prompt is all prefix.
    assert ahead == [1, 4, 8, 1, 2, 4, 1, 2]
    stats = core.step(EIGHT_PAIRS)
    # The last pair alone: its prompt (one row, all of it the tree's shared prefix) and its two completions.
    assert rows[len(ahead) :] == [1, 2]
    assert 0 < stats.final_seconds < stats.seconds


def test_a_changed_batch_or_beta_discards_the_accumulated_gradient(tiny_dir: Path) -> None:
    """A pair dropped from the queue (already trained) or a β reloaded between arrivals: what was accumulated
    no longer fits the step, and the step is the one over the batch as it is, bit for bit."""
    pairs = EIGHT_PAIRS + [(q + " pro", c + " pro", r) for q, c, r in PAIRS[:1]]
    dropped, lazy = (core_for(tiny_dir, learning_rate=1e-3, batch_size=8) for _ in range(2))
    for arrived in range(1, 9):
        dropped.prepare_step(pairs[:arrived])
    dropped.prepare_step(pairs[1:9])  # the first pair left the queue; the ninth arrived
    # The same reference terms (a pair keeps those of the chunk it was first computed in), no gradient.
    lazy.prepare_reference(pairs[:8])
    lazy.prepare_reference(pairs[1:9])
    new_beta, lazy_beta = (core_for(tiny_dir, learning_rate=1e-3, batch_size=8) for _ in range(2))
    new_beta.prepare_step(EIGHT_PAIRS[:6])
    new_beta.config.beta = lazy_beta.config.beta = 0.3
    results = [
        (core.step(batch), snapshot(core.policy))
        for core, batch in (
            (dropped, pairs[1:9]),
            (lazy, pairs[1:9]),
            (new_beta, EIGHT_PAIRS),
            (lazy_beta, EIGHT_PAIRS),
        )
    ]
    for (stats, weights), (expected_stats, expected) in (results[0:2], results[2:4]):
        assert stats.loss == expected_stats.loss
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_short_batch_and_rpo_take_the_step_they_would_take_in_one_pass(tiny_dir: Path) -> None:
    """Chunks are weighted for a full batch: a shorter one (5 of 8) is rescaled to its own mean. RPO's term
    needs the whole batch's token count, so with it nothing is accumulated ahead."""
    chunked, one_pass = (
        core_for(tiny_dir, learning_rate=1e-3, batch_size=8, gradient_batching=on) for on in (True, False)
    )
    for core in (chunked, one_pass):
        core.prepare_step(EIGHT_PAIRS[:5])
    stats = [core.step(EIGHT_PAIRS[:5]) for core in (chunked, one_pass)]
    assert stats[0].loss == pytest.approx(stats[1].loss, abs=1e-6)
    assert stats[0].grad_norm == pytest.approx(stats[1].grad_norm, rel=1e-4)
    rpo = core_for(tiny_dir, batch_size=8, rpo_alpha=1.0)
    rpo.prepare_step(EIGHT_PAIRS[:7])
    assert not rpo.gradient_batching
    assert all(p.grad is None for p in rpo.trainable_parameters())
    assert rpo.step(EIGHT_PAIRS).nll > 0


def test_a_chunk_of_reference_terms_is_one_forward_when_its_last_pair_arrives(tiny_dir: Path) -> None:
    core = core_for(tiny_dir, batch_size=8)
    assert core.reference is not None
    calls: list[int] = []  # rows of each forward of the reference
    forward = core.reference.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    core.reference.forward = counting  # a spy on the real model
    after: list[list[int]] = []
    for arrived in range(1, 9):
        core.prepare_reference(EIGHT_PAIRS[:arrived])
        after.append(list(calls))
    assert after[2] == [], "the first chunk (4 pairs) waits for its fourth pair"
    # Then the system message once, the chunk's prompts (4 rows) and its tails (chosen and rejected: 8 rows).
    assert after[3] == [1, 4, 8]
    assert after[4] == after[3] and after[5] == [1, 4, 8, 2, 4]
    assert after[6] == [1, 4, 8, 2, 4, 1, 2], "the batch's last two pairs are computed alone"
    assert after[7] == [1, 4, 8, 2, 4, 1, 2, 1, 2]
    core.step(EIGHT_PAIRS)
    assert calls == after[7], "the step computed no reference terms of its own"


def test_the_reference_reuses_its_system_message_cache_and_gives_the_same_terms(tiny_dir: Path) -> None:
    """Each pair's reference terms run only the tokens after the system message: its cache is computed once
    per core and reused, and the terms equal those computed from scratch (to float rounding). A prompt that
    does not start with the cached tokens is computed from scratch."""
    core = core_for(tiny_dir)
    assert core.reference is not None
    pair = PAIRS[1]
    batch = core.tokenize([pair])
    with torch.no_grad():
        scratch = tree_logprobs(core.reference, prompt_tree(batch))
    widths: list[int] = []
    forward = core.reference.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        widths.append(int(kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)

    core.reference.forward = counting  # a spy on the real model: what each forward is given
    prompt = int(prompt_tree(batch).prefix_ids.shape[1])
    first, second = core.reference_logprobs(batch), core.reference_logprobs(batch)
    system = len(core._system_prefix(core.reference).ids)
    assert 20 < system < prompt, (system, prompt)
    # First call: the system message once, then per call only the rest of the prompt and the two tails.
    assert widths[0] == system and widths[1] == widths[3] == prompt - system, widths
    assert len(widths) == 5, "the system message is not computed again"
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.allclose(torch.stack(first), torch.stack(scratch), atol=1e-5)

    known = core._system_prefix(core.reference)
    other = known._replace(ids=[known.ids[0] + 1, *known.ids[1:]])  # a prefix this prompt does not start with
    widths.clear()
    with torch.no_grad():
        fallback = tree_logprobs(core.reference, prompt_tree(batch), other)
    assert widths[0] == prompt and torch.allclose(torch.stack(fallback), torch.stack(scratch), atol=1e-6)


def test_a_tree_step_while_another_thread_loads_a_model(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17's crash, made deterministic: the learner loads its policy and takes a prompt-tree step while
    another thread of the process (the rewriter's announcement follower in ``test_fuzz``) is in the middle of
    loading a model. transformers makes ``PreTrainedModel.tie_weights`` a no-op process-wide while it builds
    a model, so without ``qrloop.models.loading_models`` the learner's load ties nothing: its LM head stays on
    the meta device and the step's backward fails ("MmBackward0 … expected device meta but got cpu").

    The other load is held inside its model construction (where transformers' patches are in place) until
    the learner has finished or 3 s have passed: with the lock the learner waits for it instead."""
    from transformers import LlamaForCausalLM, PreTrainedModel

    tie_weights = PreTrainedModel.tie_weights
    build = LlamaForCausalLM.__init__
    inside, release, learned = threading.Event(), threading.Event(), threading.Event()
    failures: list[BaseException] = []
    steps: list[StepStats] = []

    def held_build(self: LlamaForCausalLM, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)
        if threading.current_thread() is other:
            inside.set()
            release.wait(timeout=60)

    def load_meanwhile() -> None:
        try:
            load_policy(tiny_dir)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def learn() -> None:
        try:
            steps.append(core_for(tiny_dir, learning_rate=1e-3, prompt_tree=True).step(PAIRS))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            learned.set()

    monkeypatch.setattr(LlamaForCausalLM, "__init__", held_build)
    other, learner = threading.Thread(target=load_meanwhile), threading.Thread(target=learn)
    other.start()
    assert inside.wait(timeout=60), "the other load never reached its model construction"
    learner.start()
    learned_while_the_other_loaded = learned.wait(timeout=3.0)
    release.set()
    other.join(timeout=60)
    learner.join(timeout=120)
    assert not failures, failures
    assert len(steps) == 1 and math.isfinite(steps[0].loss)
    assert not learned_while_the_other_loaded, "model loads in two threads overlapped"
    assert PreTrainedModel.tie_weights is tie_weights, "transformers' patch outlived the loads"


# -- RPO: the chosen completions' NLL added to the loss -----------------------------------------------------


@pytest.mark.parametrize("rpo_alpha", [1.0, 0.2])
def test_rpo_term_equals_trl_sigmoid_plus_sft(tiny_dir: Path, tmp_path: Path, rpo_alpha: float) -> None:
    """``rpo_alpha`` is TRL's ``loss_type=["sigmoid", "sft"], loss_weights=[1, α]``: same loss and gradients,
    after two steps (policy ≠ reference), and the term is really there (the loss differs from α = 0's)."""
    core, batch, ours = loss_after_two_steps(tiny_dir, rpo_alpha=rpo_alpha)
    plain = dpo_loss(*core_logprobs(core, batch), beta=0.1)
    nll = float(ours.nll.detach())
    assert float(ours.loss.detach()) - float(plain.loss.detach()) == pytest.approx(rpo_alpha * nll, rel=1e-5)
    assert nll > 0.1, "the tiny model's chosen tokens are far from certain"

    trainer = trl_trainer(
        tiny_dir, tmp_path, core, loss_type=["sigmoid", "sft"], loss_weights=[1.0, rpo_alpha]
    )
    _, theirs = trl_loss_with_gradients(trainer)
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    assert_same_gradients(core, trainer)


def core_logprobs(
    core: DPOLearnerCore, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probabilities."""
    with torch.no_grad():
        policy_chosen, policy_rejected = sequence_logprobs(core.policy, batch)
        ref_chosen, ref_rejected = core.reference_logprobs(batch)
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_rpo_keeps_the_chosen_likelihood_up(tiny_dir: Path) -> None:
    """The point of the term: plain DPO may lower the chosen rewrites' likelihood while widening the margin
    (likelihood displacement); with α = 1 the same steps leave the chosen rewrites more likely than α = 0."""
    chosen: dict[float, float] = {}
    for alpha in (0.0, 1.0):
        core = core_for(tiny_dir, beta=0.1, learning_rate=1e-3, rpo_alpha=alpha)
        for _ in range(3):
            stats = core.step(PAIRS)
        policy_chosen, _, ref_chosen, _ = core_logprobs(core, core.tokenize(PAIRS))
        chosen[alpha] = float((policy_chosen - ref_chosen).mean())
        assert stats.nll > 0
    assert chosen[1.0] > chosen[0.0]
    assert chosen[1.0] > 0, "with the term the chosen rewrites become more likely than under the reference"


# -- LD-DPO: the tokens past a pair's shorter rewrite count α times ----------------------------------------


def test_ld_alpha_weights_only_the_tokens_past_the_shorter_rewrite(tiny_dir: Path) -> None:
    """At α = 0 the chosen rewrite's words past the rejected one's length do not count (two chosen rewrites
    that differ only there score the same, where plain sums differ); the shorter rewrite is counted whole;
    in between, the tail counts α times."""
    model, tokenizer = load_policy(tiny_dir)

    def logprobs(chosen: str, ld_alpha: float | None) -> tuple[float, float]:
        batch = tokenize_pairs(tokenizer, [("cordless drill", chosen, "drill")], None, eos_token=END)
        with torch.no_grad():
            chosen_lp, rejected_lp = sequence_logprobs(model, batch, ld_alpha)
        return float(chosen_lp[0]), float(rejected_lp[0])

    short, longer = "20v cordless drill driver kit", "20v cordless drill driver kit with two batteries"
    short_plain, short_shared = logprobs(short, None), logprobs(short, 0.0)
    longer_plain, longer_shared = logprobs(longer, None), logprobs(longer, 0.0)
    assert short_shared[0] == pytest.approx(longer_shared[0], abs=1e-6)
    assert abs(short_plain[0] - longer_plain[0]) > 1e-2
    assert longer_shared[1] == pytest.approx(longer_plain[1], abs=1e-6)
    full, shared = longer_plain[0], longer_shared[0]
    assert logprobs(longer, 0.5)[0] == pytest.approx(shared + 0.5 * (full - shared), rel=1e-5)


@pytest.mark.parametrize(("ld_alpha", "prompt_tree"), [(0.5, True), (0.0, False)])
def test_ld_alpha_equals_trls_ld_dpo(
    tiny_dir: Path, tmp_path: Path, ld_alpha: float, prompt_tree: bool
) -> None:
    """``ld_alpha`` is TRL's ``ld_alpha`` (LD-DPO) in either layout: same loss and gradients after two steps
    (policy ≠ reference), and the weighting is really there (plain DPO's loss on the same weights differs)."""
    core, batch, ours = loss_after_two_steps(tiny_dir, ld_alpha=ld_alpha, prompt_tree=prompt_tree)
    with torch.no_grad():
        plain = dpo_loss(
            *sequence_logprobs(core.policy, batch),
            *sequence_logprobs(core.reference, batch),
            beta=0.1,
        )
    assert abs(float(ours.loss.detach()) - float(plain.loss.detach())) > 1e-4

    trainer = trl_trainer(tiny_dir, tmp_path, core, loss_type=["sigmoid"], ld_alpha=ld_alpha)
    _, theirs = trl_loss_with_gradients(trainer)
    assert float(ours.loss.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    assert_same_gradients(core, trainer)
