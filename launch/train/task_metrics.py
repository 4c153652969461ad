"""Validation metrics of the task objectives, from predictions gathered over all ranks.

- classify: accuracy, macro F1 and per-class F1 (``val_f1/<label>``);
- seq2seq: exact match of the greedy output's text and corpus BLEU (sacrebleu, its
  default 13a tokenisation), both in percent-free units: exact match in [0, 1], BLEU in
  [0, 100] as sacrebleu reports it.

Names carry the ``val_`` prefix of ``Trainer.evaluate``'s dict (``val_loss``, ...); the
metrics logger turns ``val_x`` into ``val/x``.
"""

from __future__ import annotations


def classification_metrics(predictions: list[int], references: list[int],
                           labels: list[str]) -> dict[str, float]:
    """Accuracy, per-class F1 and macro F1 of class ids.

    Per-class F1 is 2PR/(P+R), 0 when the class is never predicted or never right. Macro
    F1 averages it over the classes that occur among the references or the predictions
    (scikit-learn's default), so a class absent from a small validation split does not
    count as a zero.

    Args:
        predictions: Predicted class ids.
        references: True class ids, same length.
        labels: Class names in id order.
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions: {len(predictions)} for {len(references)} references")
    total = len(references)
    correct = sum(p == r for p, r in zip(predictions, references, strict=True))
    out = {"val_accuracy": correct / total if total else 0.0}
    seen, f1s = set(predictions) | set(references), []
    for index, name in enumerate(labels):
        tp = sum(p == r == index for p, r in zip(predictions, references, strict=True))
        predicted = sum(p == index for p in predictions)
        actual = sum(r == index for r in references)
        f1 = 2 * tp / (predicted + actual) if tp else 0.0
        out[f"val_f1/{name}"] = f1
        if index in seen:
            f1s.append(f1)
    out["val_macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    return out


def generation_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (whitespace-stripped text equality) and corpus BLEU (sacrebleu)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses: {len(hypotheses)} for {len(references)} references")
    if not references:
        return {"val_exact_match": 0.0, "val_bleu": 0.0}
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    return {"val_exact_match": exact / len(references), "val_bleu": float(bleu)}
