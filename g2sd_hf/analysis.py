"""The paper's analyses, for any G2SD or transformers ViT classifier: occlusion invariance, representation similarity
(linear CKA) between a student and a teacher layer by layer, and accuracy on distribution shifts.

- `occlusion_curve`: accuracy as a function of the fraction of patches dropped, in random order or most salient
  first (input-gradient saliency). By default the patches are dropped from the token sequence, the paper's protocol
  (the model sees only the others, as an MAE encoder does); `protocol="fill"` instead sets their pixels to 0 in
  normalized space (the image mean) and keeps every token.
- `cka_matrix`: linear CKA between every layer of one model and every layer of another on a data set, with the
  minibatch estimator of Nguyen et al. (2021) — unbiased HSIC accumulated over batches — so it scales to big sets.
- `restrict_to_subset` / `evaluate_accuracy`: accuracy of an ImageNet-1k classifier on the 200-class ImageNet-A and
  ImageNet-R, whose logits are restricted to the subset's classes (the class lists ship with the package).

Everything takes an optional `accelerate.Accelerator`: under `accelerate launch` the data are sharded over the
processes and the counts / HSIC sums are added across them.
"""

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


# --------------------------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------------------------
def _hide_progress(accelerator) -> bool | None:
    """tqdm's `disable`: hidden on the other processes of a distributed run; `None` (tqdm: hidden when the output is
    not a terminal) on the main one, so that a log file does not get a line per update."""
    return True if accelerator is not None and not accelerator.is_local_main_process else None


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same `n` examples: `||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)` after
    centering the features (Kornblith et al., 2019).

    Args:
        x (`torch.Tensor` of shape `(n, d1)`), y (`torch.Tensor` of shape `(n, d2)`): The representations.

    Returns:
        `float` in [0, 1].

    Example:

    ```python
    >>> x = torch.randn(100, 8)
    >>> linear_cka(x, x @ torch.linalg.qr(torch.randn(8, 8))[0] * 3.0)  # invariant to rotation and scale
    1.0
    ```
    """
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


def unbiased_hsic(gram_x: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator (Song et al., 2012) of two `(n, n)` Gram matrices, n > 3."""
    n = gram_x.shape[0]
    gram_x = gram_x - torch.diag(torch.diag(gram_x))
    gram_y = gram_y - torch.diag(torch.diag(gram_y))
    ones = torch.ones(n, 1, dtype=gram_x.dtype, device=gram_x.device)
    term = (gram_x * gram_y).sum()
    term = term + (ones.T @ gram_x @ ones) * (ones.T @ gram_y @ ones) / ((n - 1) * (n - 2))
    term = term - 2 * (ones.T @ gram_x @ gram_y @ ones) / (n - 2)
    return (term / (n * (n - 3))).reshape(())


class MinibatchCKA:
    """Linear CKA between every pair of layers, accumulated over minibatches (Nguyen, Raghu & Kornblith, 2021).

    `update` takes the layers' representations of one minibatch; `compute` returns the `(layers_a, layers_b)` matrix
    `sum HSIC(K_i, L_j) / sqrt(sum HSIC(K_i, K_i) * sum HSIC(L_j, L_j))`. With an `accelerator`, the sums are added
    across processes first.

    Example:

    ```python
    >>> cka = MinibatchCKA(num_layers_a=13, num_layers_b=13)
    >>> for batch in loader:
    ...     cka.update(representations(student, batch), representations(teacher, batch))
    >>> matrix = cka.compute()
    ```
    """

    def __init__(self, num_layers_a: int, num_layers_b: int):
        self.cross = torch.zeros(num_layers_a, num_layers_b, dtype=torch.float64)
        self.self_a = torch.zeros(num_layers_a, dtype=torch.float64)
        self.self_b = torch.zeros(num_layers_b, dtype=torch.float64)

    @torch.no_grad()
    def update(self, features_a: Sequence[torch.Tensor], features_b: Sequence[torch.Tensor]) -> None:
        if features_a[0].shape[0] < 4:
            return  # the unbiased estimator needs n > 3
        grams_a = [(features.double() @ features.double().T).cpu() for features in features_a]
        grams_b = [(features.double() @ features.double().T).cpu() for features in features_b]
        for i, gram_a in enumerate(grams_a):
            self.self_a[i] += unbiased_hsic(gram_a, gram_a)
            for j, gram_b in enumerate(grams_b):
                self.cross[i, j] += unbiased_hsic(gram_a, gram_b)
        for j, gram_b in enumerate(grams_b):
            self.self_b[j] += unbiased_hsic(gram_b, gram_b)

    def compute(self, accelerator=None) -> np.ndarray:
        cross, self_a, self_b = self.cross, self.self_a, self.self_b
        if accelerator is not None and accelerator.num_processes > 1:
            cross, self_a, self_b = (
                accelerator.reduce(tensor.to(accelerator.device), "sum").cpu() for tensor in (cross, self_a, self_b)
            )
        return (cross / torch.sqrt(self_a[:, None].clamp(min=1e-12) * self_b[None, :].clamp(min=1e-12))).numpy()


def layer_representations(model, pixel_values: torch.Tensor, pooling: str = "mean") -> list[torch.Tensor]:
    """One `(batch, dim)` representation per layer (the embeddings, then each block): the mean of the tokens, or the
    cls token (`pooling="cls"`). Works for G2SD and transformers ViT-family classifiers (`output_hidden_states`)."""
    hidden_states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    if pooling == "cls":
        return [state[:, 0].float() for state in hidden_states]
    return [state.float().mean(dim=1) for state in hidden_states]


@torch.no_grad()
def cka_matrix(
    model_a, model_b, loader, pooling: str = "mean", accelerator=None, description: str = "CKA"
) -> np.ndarray:
    """Minibatch linear CKA between every layer of `model_a` (rows) and of `model_b` (columns) over `loader`
    (batches with `pixel_values`)."""
    model_a.eval()
    model_b.eval()
    # Sized from the configs (embeddings + each block), not from a first batch: with uneven sharding a process may
    # see no batch at all and must still take part in the cross-process sum.
    cka = MinibatchCKA(*(getattr(model, "module", model).config.num_hidden_layers + 1 for model in (model_a, model_b)))
    for batch in tqdm(loader, desc=description, disable=_hide_progress(accelerator), leave=False):
        pixel_values = batch["pixel_values"]
        cka.update(
            layer_representations(model_a, pixel_values.to(_device(model_a)), pooling),
            layer_representations(model_b, pixel_values.to(_device(model_b)), pooling),
        )
    return cka.compute(accelerator)


# --------------------------------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------------------------------
def occlude_patches(pixel_values: torch.Tensor, fraction: float, patch_size: int, order: torch.Tensor) -> torch.Tensor:
    """Set the pixels of the first `num_patches - int(num_patches * (1 - fraction))` patches of `order` (MAE's count
    of masked patches) to 0, the mean in normalized space.

    Args:
        pixel_values (`torch.Tensor` of shape `(batch, channels, height, width)`): Normalized images.
        fraction (`float`): Fraction of patches dropped, in [0, 1].
        patch_size (`int`): Patch side in pixels.
        order (`torch.Tensor` of shape `(batch, num_patches)`): Patch indices (row-major) in the order they are dropped.

    Returns:
        `torch.Tensor`: the occluded images (a copy).
    """
    batch_size, _, height, width = pixel_values.shape
    rows, columns = height // patch_size, width // patch_size
    num_dropped = rows * columns - int(rows * columns * (1 - fraction))  # MAE's count, as with protocol="drop"
    keep = torch.ones(batch_size, rows * columns, device=pixel_values.device)
    keep.scatter_(1, order[:, :num_dropped].to(pixel_values.device), 0.0)
    keep = keep.view(batch_size, 1, rows, columns).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    occluded = pixel_values.clone()
    occluded[..., : rows * patch_size, : columns * patch_size] *= keep
    return occluded


def patch_saliency(model, pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch saliency `(batch, num_patches)`: the L2 norm of the gradient of the predicted class's logit with
    respect to the pixels of the patch. The model's parameters get no gradients (`.grad` stays as it was)."""
    pixel_values = pixel_values.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(pixel_values=pixel_values).logits
        (gradients,) = torch.autograd.grad(logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum(), pixel_values)
    gradients = gradients.pow(2).sum(dim=1)  # (batch, height, width)
    batch_size, height, width = gradients.shape
    rows, columns = height // patch_size, width // patch_size
    gradients = gradients[:, : rows * patch_size, : columns * patch_size]
    return (
        gradients.reshape(batch_size, rows, patch_size, columns, patch_size)
        .sum(dim=(2, 4))
        .sqrt()
        .reshape(batch_size, -1)
    )


def logits_with_patches_dropped(
    model, pixel_values: torch.Tensor, fraction: float, order: torch.Tensor, output: str = "logits"
) -> torch.Tensor:
    """The logits of `model` when the first `fraction` of the patches in `order` are dropped from the token sequence:
    the encoder sees the class token(s) and the other patches (with their position embeddings) only.

    Works for `G2SDForImageClassification` (through its `mask_ratio` / `noise` arguments: the dropped patches get the
    highest noise) and transformers' `ViTForImageClassification` (its embeddings, encoder and head, run on the kept
    tokens).

    Args:
        model: The classifier.
        pixel_values (`torch.Tensor` of shape `(batch, channels, height, width)`): Normalized images.
        fraction (`float`): Fraction of the patches dropped, in [0, 1] (at 1 only the class token(s) remain).
        order (`torch.Tensor` of shape `(batch, num_patches)`): Patch indices (row-major) in the order they are dropped.
        output (`str`): Which logits of the model's output: `"logits"` (the prediction), or for a G2SD classifier with
            a distillation token `"cls_logits"` / `"distillation_logits"` (one head).
    """
    model = getattr(model, "module", model)
    num_patches = order.shape[1]
    # Rank of each patch in the drop order -> noise: random masking keeps the lowest-noise patches.
    noise = torch.empty(order.shape, device=pixel_values.device).scatter_(
        1,
        order.to(pixel_values.device),
        torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32)
        .flip(0)
        .expand_as(order)
        .contiguous(),
    )
    if hasattr(model, "g2sd"):
        return _output(
            model(pixel_values=pixel_values, mask_ratio=fraction if fraction > 0 else None, noise=noise), output
        )
    if fraction <= 0:
        return _output(model(pixel_values=pixel_values), output)
    if output != "logits":
        raise ValueError(f"{type(model).__name__} has only one head: output must be 'logits', got {output!r}.")
    if hasattr(model, "vit") and hasattr(model.vit, "embeddings"):
        vit = model.vit
        embeddings = vit.embeddings.patch_embeddings(pixel_values)  # (batch, num_patches, hidden)
        position = vit.embeddings.position_embeddings
        embeddings = embeddings + position[:, 1:]
        num_kept = int(num_patches * (1 - fraction))
        kept = noise.argsort(dim=1)[:, :num_kept]
        embeddings = embeddings.gather(1, kept[..., None].expand(-1, -1, embeddings.shape[-1]))
        cls = (vit.embeddings.cls_token + position[:, :1]).expand(embeddings.shape[0], -1, -1)
        hidden_states = torch.cat([cls, embeddings], dim=1)  # (batch, 1 + num_kept, hidden)
        layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer  # transformers 5 / 4 layouts
        for layer in layers:
            hidden_states = layer(hidden_states)
            hidden_states = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
        return model.classifier(vit.layernorm(hidden_states)[:, 0])
    raise ValueError(
        f"Dropping patches from the token sequence needs a G2SD or transformers ViT classifier, got "
        f"{type(model).__name__}: use protocol='fill'."
    )


def _output(outputs, name: str) -> torch.Tensor:
    logits = getattr(outputs, name, None)
    if logits is None:
        raise ValueError(
            f"The model's output has no {name!r} (a G2SD classifier without a distillation token has only 'logits')."
        )
    return logits


@torch.no_grad()
def occlusion_curve(
    model,
    loader,
    fractions: Sequence[float],
    patch_size: int,
    order: str = "random",
    seed: int = 0,
    accelerator=None,
    description: str = "occlusion",
    protocol: str = "drop",
    output: str = "logits",
) -> dict[float, float]:
    """Top-1 accuracy of `model` on `loader` (batches with `pixel_values` and `labels`) with each fraction of the
    patches dropped, in a random order per image (seeded) or most salient first (`order="salient"`).

    `protocol="drop"` (default, the paper's) removes the patches from the token sequence
    (`logits_with_patches_dropped`); `protocol="fill"` sets their pixels to the image mean (`occlude_patches`).
    `output` picks the logits scored (`"cls_logits"` / `"distillation_logits"`: one head of a G2SD classifier)."""
    if order not in ("random", "salient"):
        raise ValueError(f"order must be 'random' or 'salient', got {order!r}.")
    if protocol not in ("drop", "fill"):
        raise ValueError(
            f"protocol must be 'drop' (from the token sequence) or 'fill' (pixels to the mean), got {protocol!r}."
        )
    model.eval()
    device = _device(model)
    correct = torch.zeros(len(fractions), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    for batch in tqdm(loader, desc=description, disable=_hide_progress(accelerator), leave=False):
        pixel_values, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
        num_patches = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        if order == "random":
            patch_order = torch.rand(pixel_values.shape[0], num_patches, generator=generator).argsort(dim=1)
        else:
            patch_order = patch_saliency(model, pixel_values, patch_size).argsort(dim=1, descending=True).cpu()
        for index, fraction in enumerate(fractions):
            if protocol == "drop":
                logits = logits_with_patches_dropped(model, pixel_values, fraction, patch_order, output)
            else:
                logits = _output(
                    model(pixel_values=occlude_patches(pixel_values, fraction, patch_size, patch_order)), output
                )
            correct[index] += (logits.argmax(dim=1) == labels).sum().double().cpu()
        total += labels.shape[0]
    if accelerator is not None and accelerator.num_processes > 1:
        correct = accelerator.reduce(correct.to(accelerator.device), "sum").cpu()
        total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    return {float(fraction): float(correct[index] / total) for index, fraction in enumerate(fractions)}


# --------------------------------------------------------------------------------------------------------------------
# ImageNet-A / ImageNet-R
# --------------------------------------------------------------------------------------------------------------------
@lru_cache
def _imagenet_lists() -> dict:
    return json.loads((Path(__file__).parent / "imagenet_subsets.json").read_text())


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k WordNet ids in class-index order."""
    return list(_imagenet_lists()["imagenet_1k_wnids"])


def subset_indices(name: str) -> list[int]:
    """ImageNet-1k class indices of the 200 classes of `"imagenet-a"` or `"imagenet-r"` (Hendrycks et al.)."""
    key = {"imagenet-a": "imagenet_a_wnids", "imagenet-r": "imagenet_r_wnids"}.get(name)
    if key is None:
        raise ValueError(f"Unknown subset {name!r}: 'imagenet-a' or 'imagenet-r'.")
    subset = set(_imagenet_lists()[key])
    return [index for index, wnid in enumerate(imagenet_wnids()) if wnid in subset]


def restrict_to_subset(logits: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """The ImageNet-1k class index predicted among `indices` only: `indices[argmax(logits[:, indices])]`."""
    indices = torch.as_tensor(list(indices), device=logits.device)
    return indices[logits[:, indices].argmax(dim=1)]


@torch.no_grad()
def evaluate_accuracy(
    model, loader, indices: Sequence[int] | None = None, accelerator=None, description: str = "evaluation"
) -> dict:
    """Top-1 accuracy of `model` on `loader` (batches with `pixel_values` and ImageNet-1k `labels`), the prediction
    restricted to `indices` when given."""
    model.eval()
    device = _device(model)
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in tqdm(loader, desc=description, disable=_hide_progress(accelerator), leave=False):
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        predictions = restrict_to_subset(logits, indices) if indices is not None else logits.argmax(dim=1)
        counts += torch.tensor(
            [(predictions.cpu() == batch["labels"].cpu()).sum().item(), len(predictions)], dtype=torch.float64
        )
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
    return {"accuracy": float(counts[0] / max(counts[1], 1)), "samples": int(counts[1])}


# --------------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------------
def plot_occlusion(curves: dict[str, dict[float, float]], path: str, title: str = "Occlusion invariance") -> None:
    """Accuracy against the fraction of patches dropped, one line per model, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        fractions = sorted(curve)
        axis.plot(
            [100 * fraction for fraction in fractions],
            [curve[fraction] for fraction in fractions],
            marker="o",
            label=name,
        )
    axis.set_xlabel("patches dropped (%)")
    axis.set_ylabel("top-1 accuracy")
    axis.set_title(title)
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_cka(
    matrices: dict[str, np.ndarray], path: str, xlabel: str = "teacher layer", ylabel: str = "student layer"
) -> None:
    """One heat map per `(name, matrix)`, rows = the first model's layers (0 = embeddings), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    for axis, (name, matrix) in zip(axes[0], matrices.items()):
        image = axis.imshow(matrix, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _device(model) -> torch.device:
    return next(model.parameters()).device


__all__ = [
    "MinibatchCKA",
    "cka_matrix",
    "evaluate_accuracy",
    "imagenet_wnids",
    "layer_representations",
    "linear_cka",
    "logits_with_patches_dropped",
    "occlude_patches",
    "occlusion_curve",
    "patch_saliency",
    "plot_cka",
    "plot_occlusion",
    "restrict_to_subset",
    "subset_indices",
    "unbiased_hsic",
]
