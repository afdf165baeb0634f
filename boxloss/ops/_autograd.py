"""Second-order autograd of the private backward ops (``boxloss::_<op>_backward``).

``torch.autograd.grad(loss, x, create_graph=True)`` runs an op's backward op
with gradient tracking on, so that the gradient can be differentiated again
(gradient penalties, Hessian-vector products).  Each backward op therefore
gets an autograd formula of its own: the exact derivative where it is cheap
(the ops whose backward is linear in the incoming gradient and affine or
piecewise constant in the inputs: :mod:`~boxloss.ops.row_col_max`,
:mod:`~boxloss.ops.sparse_crf`, :mod:`~boxloss.ops.dense_crf`; the lattice
filter's backward is the filter itself), and otherwise
:func:`first_order_only`, a formula that raises naming the public function.
Without one, PyTorch would only warn that no autograd kernel is registered
and treat the gradient as a constant: the second derivative would silently
come out as 0.
"""

from __future__ import annotations

import torch


class DoubleBackwardError(NotImplementedError):
    """Differentiating the gradient of an op whose second derivative is not implemented."""


def first_order_only(backward_op: str, public: str) -> None:
    """Registers for ``boxloss::<backward_op>`` an autograd formula that raises :class:`DoubleBackwardError`.

    The error comes when the gradient computed with ``create_graph=True`` is
    itself differentiated, and names ``public``, the function the user called.
    """

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise DoubleBackwardError(
            f"{public}: double backward is not implemented: its gradient (boxloss::{backward_op}) is computed by "
            "a fused kernel without a derivative of its own, so the gradient cannot be differentiated again "
            "(torch.autograd.grad(..., create_graph=True) followed by another backward, e.g. a gradient penalty "
            "or a Hessian-vector product). Differentiate a first-order quantity instead, or use finite "
            "differences of the gradient."
        )

    torch.library.register_autograd(f"boxloss::{backward_op}", backward, setup_context=setup_context)
