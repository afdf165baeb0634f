r"""Label-uncertainty losses with online bootstrapping, the fused ones
(R. Neven, D. Neven, B. De Brabandere, M. Proesmans and T. Goedemé,
"Weakly-Supervised Semantic Segmentation by Learning Label Uncertainty",
arXiv:2110.05926, 2021, Sec. 3).

The network predicts, per pixel, a Gaussian over logits: a mean ``mu`` and a
log-variance ``log_var`` (:math:`s = \log\sigma^2`).  Where a box label is
wrong (the background inside a box), mixing in a few pixel-perfect images
makes the model raise the variance there (Sec. 3.2); bootstrapping then flips
the target where the variance is high (Sec. 3.3).

* :func:`uncertainty_bce_loss` -- binary, closed form (Eq. 8-11), a fused
  elementwise op;
* :func:`boxloss.uncertainty_l2_loss` -- the regression loss with uncertainty
  (Eq. 2-3), plain PyTorch, in :mod:`boxloss.losses.uncertainty`;
* :func:`uncertainty_ce_loss` -- multi-class, Monte Carlo over Gaussian logits
  (Eq. 13-16) in one fused kernel that draws its noise from a counter-based
  generator (Philox4x32-10) inside the kernel: memory independent of the number
  of samples, the backward regenerates the forward's noise.

**Why a log-variance.** ``sigma^2 = exp(log_var)`` is positive for every
network output without a clamp or softplus, the gradient never divides by a
variance that can reach 0, and every quantity the losses need (``1/sigma^2``,
Eq. 8's ``(1 + pi sigma^2 / 8)^{-1/2}``, Eq. 11's ``W (1 - W) sigma^2``) is an
exponential of a sum of logs that the kernels evaluate without overflow: the
losses and their gradients stay finite for ``|mu|`` up to 1e4 and ``log_var``
in [-20, 20] (tested), where a ``var`` input would need 1e-9 to 5e8.
"""

from __future__ import annotations

import math

import torch

from boxloss import _checks, _fallback
from boxloss._extension import extension_loaded
from boxloss.ops._autograd import first_order_only

TAU = 2.5  # the paper's threshold on sigma^2 (Sec. 4.1.2), also the multi-class default
TEMPERATURE = 0.2  # Eq. 11
SAMPLES = 20  # T of Eq. 15 in the paper's experiments
IGNORE_INDEX = 255
MAX_SAMPLES = 2**31 - 1

_BCE = "uncertainty_bce_loss"
_CE = "uncertainty_ce_loss"


# ---------------------------------------------------------------- checks


def _as_map(fn: str, name: str, value, *, batch_layout: str) -> torch.Tensor:
    """(B, H, W) view of a (B, H, W) or (B, 1, H, W) tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape {batch_layout}, got {type(value).__name__}")
    if value.dim() == 4 and value.shape[1] == 1:
        return value[:, 0]
    if value.dim() != 3:
        raise ValueError(f"{fn}: {name} must have shape {batch_layout}, got shape {tuple(value.shape)}")
    return value


def _check_non_empty(fn: str, mu: torch.Tensor, layout: str) -> None:
    if mu.numel() == 0:
        raise ValueError(f"{fn}: mu must be non-empty in every dimension {layout}, got shape {tuple(mu.shape)}")


def _check_masks(fn: str, mu: torch.Tensor, box_mask, pixel_perfect, B: int, H: int, W: int):
    if box_mask is not None:
        box_mask = _as_map(fn, "box_mask", box_mask, batch_layout="(B, H, W)")
        if box_mask.dtype != torch.bool:
            raise TypeError(f"{fn}: box_mask must be a bool tensor, got {box_mask.dtype}")
        if tuple(box_mask.shape) != (B, H, W):
            raise ValueError(f"{fn}: box_mask must have shape {(B, H, W)}, got {tuple(box_mask.shape)}")
        _checks.check_same(fn, "box_mask", box_mask, "mu", mu, what="device")
    if pixel_perfect is not None:
        if not isinstance(pixel_perfect, torch.Tensor):
            raise TypeError(
                f"{fn}: pixel_perfect must be a bool tensor of shape (B,), got {type(pixel_perfect).__name__}"
            )
        if pixel_perfect.dtype != torch.bool:
            raise TypeError(f"{fn}: pixel_perfect must be a bool tensor, got {pixel_perfect.dtype}")
        if tuple(pixel_perfect.shape) != (B,):
            raise ValueError(f"{fn}: pixel_perfect must have shape {(B,)}, got {tuple(pixel_perfect.shape)}")
        _checks.check_same(fn, "pixel_perfect", pixel_perfect, "mu", mu, what="device")
    return box_mask, pixel_perfect


def _check_bool(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value


def _check_finite(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be a finite number, got {value}")
    return value


def _check_ignore_index(fn: str, ignore_index, *, binary: bool = False) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if binary and ignore_index in (0, 1):
        raise ValueError(f"{fn}: ignore_index must not be 0 or 1, the binary labels, got {ignore_index}")
    return ignore_index


def _check_binary_args(fn, mu, log_var, target, box_mask, pixel_perfect, reduction, ignore_index):
    """The checked (B, H, W) inputs, the target with its void pixels set to 0, and the (B, H, W) bool map of the
    pixels that are not void."""
    layout = "(B, H, W) or (B, 1, H, W)"
    mu = _as_map(fn, "mu", mu, batch_layout=layout)
    log_var = _as_map(fn, "log_var", log_var, batch_layout=layout)
    target = _as_map(fn, "target", target, batch_layout=layout)
    _checks.check_float_dtype(fn, "mu", mu)
    _check_non_empty(fn, mu, layout)
    if log_var.shape != mu.shape:
        raise ValueError(f"{fn}: log_var must have the shape of mu ({tuple(mu.shape)}), got {tuple(log_var.shape)}")
    _checks.check_same(fn, "log_var", log_var, "mu", mu, what="dtype")
    _checks.check_same(fn, "log_var", log_var, "mu", mu, what="device")
    if target.shape != mu.shape:
        raise ValueError(f"{fn}: target must have the shape of mu ({tuple(mu.shape)}), got {tuple(target.shape)}")
    _checks.check_same(fn, "target", target, "mu", mu, what="device")
    if target.is_complex():
        raise TypeError(f"{fn}: target must hold real values in [0, 1], got {target.dtype}")
    B, H, W = mu.shape
    box_mask, pixel_perfect = _check_masks(fn, mu, box_mask, pixel_perfect, B, H, W)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    ignore_index = _check_ignore_index(fn, ignore_index, binary=True)
    valid = target != ignore_index
    target = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    return mu, log_var, target.to(mu.dtype), box_mask, pixel_perfect, valid


def _reduce_valid(per_pixel: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Void pixels set to 0 (no gradient reaches them), then the mean over the other pixels (0 when there are
    none), the sum, or the per-pixel map."""
    per_pixel = torch.where(valid, per_pixel, torch.zeros((), dtype=per_pixel.dtype, device=per_pixel.device))
    if reduction == "mean":
        return per_pixel.sum() / valid.sum().clamp_min(1).to(per_pixel.dtype)
    return per_pixel.sum() if reduction == "sum" else per_pixel


# ---------------------------------------------------------------- binary


def uncertainty_bce_loss(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    box_mask: torch.Tensor | None,
    *,
    tau: float = TAU,
    temperature: float = TEMPERATURE,
    bootstrap: bool = True,
    pixel_perfect: torch.Tensor | None = None,
    route_gradients: bool = True,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""Binary cross-entropy with a Gaussian logit and uncertainty-based online
    bootstrapping (Eq. 8-11 of Neven et al.), fused.

    With :math:`\sigma^2 = e^{s}`, ``s = log_var``, at pixels inside ``box_mask``
    of images that are not ``pixel_perfect``:

    .. math::
        E[\hat p] = \mathrm{sigmoid}\Big(\frac{\mu}{\sqrt{1 + \pi\sigma^2/8}}\Big), \qquad
        L_u = \mathrm{BCE}(E[\hat p], y)                                          \quad (8, 9)

        W = \mathrm{sigmoid}\Big(\frac{\tau - \sigma^2}{0.2}\Big), \qquad
        L_b = W\,\mathrm{BCE}(\mu, y) + (1 - W)\,\mathrm{BCE}(\mu, y^*),\quad y^* = 1 - y \quad (10, 11)

    and ``L = L_u + L_b`` (``L_u`` alone with ``bootstrap=False``).  Everywhere
    else (outside the boxes, and on every pixel of a ``pixel_perfect`` image: the
    paper's mixed batches) ``L = BCE(mu, y)``.  ``BCE(mu, y)`` takes logits.
    Pixels whose target is ``ignore_index`` (void) contribute 0.

    **Gradient routing** (Sec. 3.3, ``route_gradients=True``, the default): the
    variance learns only through ``L_u`` (which sees ``mu`` as a constant), the
    mean only through ``L_b`` (which sees ``s`` only through the value of ``W``).
    ``route_gradients=False`` differentiates both terms fully.  Without
    bootstrapping there is nothing to route: both learn through ``L_u``.

    Args:
        mu: mean logits, finite.
        log_var: log-variances ``s`` (see the module docstring for why a log),
            finite.  NaN or Inf in ``mu`` or ``log_var`` raise ``ValueError``.
        target: object probability in [0, 1] (1 object, 0 background; soft
            targets allowed), or ``ignore_index`` at void pixels; converted to
            the dtype of ``mu``.  NaN or other values outside [0, 1] raise
            ``ValueError``.
        box_mask: bool, True inside the boxes (where the label may be wrong);
            None: every pixel.
        tau: the threshold on ``sigma^2`` of Eq. 11 (the paper's 2.5).
        temperature: the 0.2 of Eq. 11.
        bootstrap: add ``L_b`` (Sec. 3.3).
        pixel_perfect: bool, one per image: True for images with pixel-perfect
            labels, which get plain BCE everywhere.
        route_gradients: see above.
        reduction: ``"mean"`` over the pixels whose target is not ``ignore_index``
            (0, with a zero gradient, when there are none), ``"sum"``, or ``"none"``
            (the (B, H, W) per-pixel losses, 0 at void pixels).
        ignore_index: target value of void pixels (VOC's 255 by default, as
            :func:`uncertainty_ce_loss`): they contribute 0 and no gradient.  Not
            0 or 1.

    Shape:
        - mu, log_var, target: :math:`(B, H, W)` or :math:`(B, 1, H, W)`;
          float16/bfloat16 run in float32, float32, float64.
        - box_mask: :math:`(B, H, W)` (or :math:`(B, 1, H, W)`), bool.
        - pixel_perfect: :math:`(B,)`, bool.
        - output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Example:
        >>> import torch, boxloss
        >>> out = torch.randn(2, 2, 32, 32, requires_grad=True)   # mean and log-variance maps
        >>> target = torch.zeros(2, 32, 32); target[:, 8:24, 8:24] = 1
        >>> box_mask = target.bool()                                 # boxes as masks
        >>> loss = boxloss.uncertainty_bce_loss(out[:, 0], out[:, 1], target, box_mask,
        ...                                     pixel_perfect=torch.tensor([True, False]))
        >>> loss.backward()
    """
    mu, log_var, target, box_mask, pixel_perfect, valid = _check_binary_args(
        _BCE, mu, log_var, target, box_mask, pixel_perfect, reduction, ignore_index
    )
    tau = _check_finite(_BCE, "tau", tau)
    temperature = _checks.check_positive(_BCE, "temperature", temperature)
    bootstrap = _check_bool(_BCE, "bootstrap", bootstrap)
    route_gradients = _check_bool(_BCE, "route_gradients", route_gradients)
    if extension_loaded():
        per_pixel = torch.ops.boxloss.uncertainty_bce_loss.default(
            mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap, route_gradients
        )
    else:
        per_pixel = _fallback.uncertainty_bce_loss(
            _BCE, mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap, route_gradients
        )
    return _reduce_valid(per_pixel, valid, reduction)


# ---------------------------------------------------------------- multi-class


def _seed_tensor(fn: str, seed, generator) -> torch.Tensor:
    """The (key, offset) int64 CPU tensor the op reads."""
    if seed is not None and generator is not None:
        raise ValueError(f"{fn}: pass seed or generator, not both")
    if seed is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
        # Advances torch's default CPU generator (or `generator`): consecutive
        # calls draw different noise, torch.manual_seed makes them repeatable.
        device = generator.device if generator is not None else "cpu"
        key = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, generator=generator, device=device)
        return torch.cat([key.cpu(), torch.zeros(1, dtype=torch.int64)])
    offset = 0
    if isinstance(seed, tuple):
        if len(seed) != 2:
            raise ValueError(f"{fn}: seed must be an int or a pair (seed, offset), got {seed!r}")
        seed, offset = seed
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"{fn}: the seed's offset must be an int, got {type(offset).__name__}")
        if not 0 <= offset < 2**32:
            raise ValueError(f"{fn}: the seed's offset must lie in [0, 2^32), got {offset}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, a pair (seed, offset) or None, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"{fn}: seed must lie in [-2^63, 2^64), got {seed}")
    if seed >= 2**63:
        seed -= 2**64  # the same 64 bits as int64
    return torch.tensor([seed, offset], dtype=torch.int64)


def uncertainty_ce_loss(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    *,
    samples: int = SAMPLES,
    seed: int | tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    tau: float = TAU,
    bootstrap: bool = True,
    box_mask: torch.Tensor | None = None,
    pixel_perfect: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    route_gradients: bool = True,
) -> torch.Tensor:
    r"""Multi-class cross-entropy with Gaussian logits and uncertainty-based
    online bootstrapping (Eq. 13-16 of Neven et al.), in one fused kernel.

    With per-class variances :math:`\sigma_c^2 = e^{s_c}`, ``s = log_var``, and
    T samples :math:`l_t = \mu + \sigma \odot \epsilon_t`, at pixels inside
    ``box_mask`` of images that are not ``pixel_perfect``:

    .. math::
        L_u = -\log \frac{1}{T}\sum_{t=1}^{T} \mathrm{softmax}(l_t)_y
            = \log T - \mathrm{LSE}_t\big(l_{t,y} - \mathrm{LSE}_c\, l_{t,c}\big)   \quad (13\text{-}15)

        y^* = \begin{cases} \arg\max_c \mu_c & \text{if } \max_c \sigma_c^2 > \tau \\
                            y & \text{otherwise} \end{cases}                          \quad (16)

    and ``L = L_u + CE(mu, y*)`` (``L_u`` alone with ``bootstrap=False``); the log
    of the mean over samples, not the mean of the logs.  Everywhere else
    ``L = CE(mu, y)``; pixels whose target is ``ignore_index`` contribute 0.

    **Gradient routing** (Sec. 3.3, default): ``L_u`` sees ``mu`` as a constant
    (the variance learns only through it); ``CE(mu, y*)`` sees ``log_var`` only
    through the flip (not differentiable).  ``route_gradients=False`` lets
    ``L_u`` reach ``mu`` as well.  With ``bootstrap=False``, ``mu`` learns
    through ``L_u``.

    **Noise.** ``eps`` is drawn inside the kernel from Philox4x32-10, keyed by
    the seed and counted by (class // 4, sample, pixel, offset) (layout in
    ``csrc/include/boxloss/uncertainty/math.h``); no sample tensor exists, and
    the backward regenerates the noise.  The same seed gives the same loss and
    gradient, on any thread count, and the same noise on CPU and CUDA.
    ``seed=None`` draws a 64-bit key from ``generator`` (default: torch's global
    CPU generator), so ``torch.manual_seed`` makes training repeatable and
    consecutive calls differ.  ``seed=(s, k)`` sets the offset ``k`` too (e.g.
    the training step).  Inside ``torch.compile`` pass ``seed`` (the compiled
    graph replaces torch's RNG, so a drawn key differs from eager) or leave both
    None; a ``generator`` object cannot be traced.

    Args:
        mu: mean logits, finite.
        log_var: per-class log-variances (diagonal covariance), finite.  NaN or
            Inf in ``mu`` or ``log_var`` raise ``ValueError`` (on any pixel,
            ignored or not).
        target: class indices (any integer dtype) in [0, C) or ``ignore_index``;
            other values raise ``ValueError``.
        samples: T >= 1.  Memory does not depend on it; time grows linearly.
        seed, generator: see above.
        tau: threshold on :math:`\max_c \sigma_c^2` (default 2.5, the paper's
            binary threshold: with one uncertain class its variance is the binary
            logit's variance, so the same value flips at the same uncertainty).
        bootstrap: add ``CE(mu, y*)``.
        box_mask: bool (B, H, W), True inside the boxes; None: every pixel.
        pixel_perfect: bool (B,), images with pixel-perfect labels (plain CE).
        ignore_index: target value that is ignored.
        reduction: ``"mean"`` over the pixels whose target is not ``ignore_index``
            (0, with a zero gradient, when there are none), ``"sum"``, or ``"none"``
            (the (B, H, W) per-pixel losses, 0 at ignored pixels).
        route_gradients: see above.

    Shape:
        - mu, log_var: :math:`(B, C, H, W)`; float16/bfloat16 run in float32, float32, float64.
        - target: :math:`(B, H, W)`, integer.
        - box_mask: :math:`(B, H, W)`, bool.  pixel_perfect: :math:`(B,)`, bool.
        - output: scalar, or :math:`(B, H, W)` for ``reduction="none"``.

    Example:
        >>> import torch, boxloss
        >>> mu = torch.randn(2, 21, 32, 32, requires_grad=True)
        >>> log_var = torch.full((2, 21, 32, 32), -2.0, requires_grad=True)
        >>> target = torch.randint(0, 21, (2, 32, 32))
        >>> loss = boxloss.uncertainty_ce_loss(mu, log_var, target, samples=20, seed=0,
        ...                                    box_mask=target > 0, pixel_perfect=torch.tensor([True, False]))
        >>> loss.backward()
    """
    fn = _CE
    mu = _checks.check_tensor(fn, "mu", mu, dim=4, layout="(B, C, H, W)")
    log_var = _checks.check_tensor(fn, "log_var", log_var, dim=4, layout="(B, C, H, W)")
    _checks.check_float_dtype(fn, "mu", mu)
    _check_non_empty(fn, mu, "(B, C, H, W)")
    if log_var.shape != mu.shape:
        raise ValueError(f"{fn}: log_var must have the shape of mu ({tuple(mu.shape)}), got {tuple(log_var.shape)}")
    _checks.check_same(fn, "log_var", log_var, "mu", mu, what="dtype")
    _checks.check_same(fn, "log_var", log_var, "mu", mu, what="device")
    B, C, H, W = mu.shape
    target = _checks.check_tensor(fn, "target", target, dim=3, layout="(B, H, W)")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != (B, H, W):
        raise ValueError(f"{fn}: target must have shape {(B, H, W)}, got {tuple(target.shape)}")
    _checks.check_same(fn, "target", target, "mu", mu, what="device")
    box_mask, pixel_perfect = _check_masks(fn, mu, box_mask, pixel_perfect, B, H, W)
    samples = _checks.check_int(fn, "samples", samples, minimum=1)
    if samples > MAX_SAMPLES:
        raise ValueError(f"{fn}: samples must be below 2^31, got {samples}")
    tau = _checks.check_positive(fn, "tau", tau)
    bootstrap = _check_bool(fn, "bootstrap", bootstrap)
    route_gradients = _check_bool(fn, "route_gradients", route_gradients)
    ignore_index = _check_ignore_index(fn, ignore_index)
    _checks.check_choice(fn, "reduction", reduction, _checks.REDUCTIONS)
    seed_tensor = _seed_tensor(fn, seed, generator)
    target = target.long()

    if extension_loaded():
        per_pixel, _ = torch.ops.boxloss.uncertainty_ce_loss.default(
            mu,
            log_var,
            target,
            box_mask,
            pixel_perfect,
            seed_tensor,
            samples,
            tau,
            bootstrap,
            route_gradients,
            ignore_index,
        )
    else:
        per_pixel = _fallback.uncertainty_ce_loss(
            fn,
            mu,
            log_var,
            target,
            box_mask,
            pixel_perfect,
            seed_tensor,
            samples,
            tau,
            bootstrap,
            route_gradients,
            ignore_index,
        )
    if reduction == "mean":
        count = (target != ignore_index).sum().clamp_min(1)
        return per_pixel.sum() / count.to(per_pixel.dtype)
    return per_pixel.sum() if reduction == "sum" else per_pixel


def _register() -> None:
    @torch.library.register_fake("boxloss::uncertainty_bce_loss")
    def _bce_fake(mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap, route_gradients):
        return mu.new_empty(mu.shape)

    @torch.library.register_fake("boxloss::_uncertainty_bce_loss_backward")
    def _bce_backward_fake(
        grad, mu, log_var, target, box_mask, pixel_perfect, tau, temperature, bootstrap, route_gradients
    ):
        return mu.new_empty(mu.shape), mu.new_empty(mu.shape)

    def bce_setup_context(ctx, inputs, output):
        mu, log_var, target, box_mask, pixel_perfect, *settings = inputs
        ctx.save_for_backward(mu, log_var, target, box_mask, pixel_perfect)
        ctx.settings = settings

    def bce_backward(ctx, grad):
        grad_mu = grad_log_var = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_mu, grad_log_var = torch.ops.boxloss._uncertainty_bce_loss_backward.default(
                grad, *ctx.saved_tensors, *ctx.settings
            )
        # The target and the masks are constants of the loss.
        return grad_mu, grad_log_var, None, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::uncertainty_bce_loss", bce_backward, setup_context=bce_setup_context)

    @torch.library.register_fake("boxloss::uncertainty_ce_loss")
    def _ce_fake(
        mu, log_var, target, box_mask, pixel_perfect, seed, samples, tau, bootstrap, route_gradients, ignore_index
    ):
        shape = (mu.shape[0], mu.shape[2], mu.shape[3])
        return mu.new_empty(shape), mu.new_empty(shape)

    @torch.library.register_fake("boxloss::_uncertainty_ce_loss_backward")
    def _ce_backward_fake(
        grad,
        mu,
        log_var,
        target,
        box_mask,
        pixel_perfect,
        seed,
        sample_lse,
        samples,
        tau,
        bootstrap,
        route_gradients,
        ignore_index,
    ):
        return mu.new_empty(mu.shape), mu.new_empty(mu.shape)

    def ce_setup_context(ctx, inputs, output):
        mu, log_var, target, box_mask, pixel_perfect, seed, *settings = inputs
        # Per-pixel quantities only: the backward regenerates the noise from
        # the seed, so what is kept does not grow with the number of samples.
        ctx.save_for_backward(mu, log_var, target, box_mask, pixel_perfect, seed, output[1])
        ctx.settings = settings
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def ce_backward(ctx, grad, _grad_sample_lse):
        grad_mu = grad_log_var = None
        if grad is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            mu, log_var, target, box_mask, pixel_perfect, seed, sample_lse = ctx.saved_tensors
            grad_mu, grad_log_var = torch.ops.boxloss._uncertainty_ce_loss_backward.default(
                grad, mu, log_var, target, box_mask, pixel_perfect, seed, sample_lse, *ctx.settings
            )
        return grad_mu, grad_log_var, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("boxloss::uncertainty_ce_loss", ce_backward, setup_context=ce_setup_context)

    # Second derivatives of the routed, Monte Carlo gradients are not implemented.
    first_order_only("_uncertainty_bce_loss_backward", _BCE)
    first_order_only("_uncertainty_ce_loss_backward", _CE)


if extension_loaded():
    _register()
