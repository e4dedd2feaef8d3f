"""Markdown for the registry: a model card per version and the contract of a registered model."""

from __future__ import annotations

from typing import Mapping, Sequence

from common.redaction import redact_params
from tasks.data.datasets import DatasetRef
from tasks.data.decoding import Preprocessing
from tasks.track.reports import Provenance, link, markdown_table

PER_CLASS_COLUMNS = ("class_name", "precision", "recall", "f1", "support")


def version_card(
    dataset: DatasetRef,
    split_sizes: Mapping[str, int],
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    per_class: Sequence[Mapping[str, object]],
    parity: Mapping[str, object],
    outcome: str,
    provenance: Provenance,
) -> str:
    """What a registered version was trained on, how good it is, how it was checked and why it got
    its alias; `outcome` is the gate's sentence (e.g. "champion: there is no champion yet")."""
    sizes = ", ".join(f"{context} {count}" for context, count in split_sizes.items())
    shown = redact_params(params)  # a card is read by anyone who can read the registry
    settings = ", ".join(f"`{key}={value}`" for key, value in shown.items() if value is not None)
    return "\n".join(
        [
            f"## {dataset.name}: test accuracy {metrics['test_accuracy']:.4f}",
            f"- **Dataset** `{dataset.name}`, sha256 `{dataset.sha256}`; images: {sizes}",
            f"- **Preprocessing** {preprocessing_sentence(dataset.preprocessing)}",
            f"- **Test** accuracy {metrics['test_accuracy']:.4f}, macro F1 {metrics['test_macro_f1']:.4f}, "
            f"loss {metrics['test_loss']:.4f}",
            f"- **ONNX parity** max |logit diff| {parity['max_abs_diff']:.3g} (limit "
            f"{parity.get('tolerance', 1e-4):.3g}) on {parity['samples']} "
            f"images in batches and {parity['single_samples']} at batch 1, top-1 agreement "
            f"{parity['top1_agreement']:.4f}: {'passed' if parity['passed'] else 'failed'}",
            f"- **Promotion** {outcome}",
            f"- **Provenance** MLflow run {link(provenance.run_id, provenance.run_url)}, Prefect flow run "
            f"{link(provenance.flow_run_id or 'none', provenance.flow_run_url)}, git commit "
            f"`{provenance.git_commit or 'unknown'}`",
            f"- **Config** {settings}",
            "",
            "### Per class (test split)",
            markdown_table(per_class, PER_CLASS_COLUMNS),
        ]
    )


def preprocessing_sentence(prep: Preprocessing) -> str:
    """How an image file of any size becomes the model's input, in words."""
    height, width = prep.size
    how = {
        "crop": "shorter side resized to fit, then centre-cropped",
        "pad": "resized to fit inside, then padded with black (letterbox)",
        "stretch": "resized to the size, aspect ratio not kept",
    }[prep.resize_mode]
    colour = "grey (1 channel)" if prep.channels == 1 else "RGB (3 channels)"
    return (
        f"{colour}, {height}x{width} pixels, resize mode `{prep.resize_mode}` ({how}; antialiased "
        "bilinear); EXIF orientation applied, alpha composited on white, 16-bit scaled to 8"
    )


def model_contract(prep: Preprocessing, class_names: Sequence[str]) -> str:
    """What every version of a registered model takes and returns."""
    height, width = prep.size
    return (
        f"Image classifier. Input: float32 pixels in [0, 1], shape (N, {prep.channels}, {height}, {width}) "
        f"(N, C, H, W). Preprocessing of image files (stored in the model's metadata; batch prediction "
        f"and `python -m tasks.predict.serving` apply it): {preprocessing_sentence(prep)}. Output: "
        f"float32 logits, shape (N, {len(class_names)}); softmax gives probabilities. Classes in index "
        f"order: {', '.join(class_names)}."
    )
