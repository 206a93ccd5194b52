"""Pure-NumPy optimizer updates: the oracle for the fused kernels.

One parameter at a time, plain NumPy in the parameter's dtype, each formula
written exactly as in shared/SEMANTICS.md and in the order written there.  A
Python float meeting a float32 array is rounded to float32 first (NumPy's
NEP 50 rule), so float32 parameters are updated in float32 arithmetic, as the
kernels do.

Every function updates `param` and the state buffers IN PLACE and never
modifies `grad`.  Scalar arguments are plain Python numbers; the step counter
`step` is the value AFTER this step's increment (1 on the first step).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import numpy as np


def _signed(grad: np.ndarray, maximize: bool) -> np.ndarray:
    return -grad if maximize else grad


# section: SGD and Momentum ---------------------------------------------------

def sgd_update(param: np.ndarray, grad: np.ndarray, momentum_buffer: Optional[np.ndarray], *,
               lr: float, momentum: float, dampening: float, weight_decay: float,
               nesterov: bool, maximize: bool) -> Optional[np.ndarray]:
    """torch.optim.SGD for one parameter.

    if maximize g = -g; g += weight_decay * param; first step b = g, then
    b = momentum * b + (1 - dampening) * g; direction = g + momentum * b if
    nesterov else b; param -= lr * direction.

    Parameters
    ----------
    param : ndarray, IN/OUT
    grad : ndarray, IN
    momentum_buffer : ndarray or None, IN/OUT
        None before the first step with momentum (then a new buffer is made).

    Returns
    -------
    ndarray or None
        The momentum buffer to keep in the state (None when momentum == 0).
    """
    g = _signed(grad, maximize)
    if weight_decay != 0:
        g = g + weight_decay * param
    if momentum != 0:
        if momentum_buffer is None:
            momentum_buffer = np.array(g, copy=True)
        else:
            np.add(momentum * momentum_buffer, (1 - dampening) * g, out=momentum_buffer)
        direction = g + momentum * momentum_buffer if nesterov else momentum_buffer
    else:
        direction = g
    param -= lr * direction
    return momentum_buffer if momentum != 0 else None


def momentum_update(param: np.ndarray, grad: np.ndarray, momentum_buffer: np.ndarray, *,
                    lr: float, momentum: float, weight_decay: float, maximize: bool) -> None:
    """Textbook momentum: v = beta * v + (1 - beta) * g; param -= lr * v.

    `momentum` is beta; the buffer v starts at zero.  With weight decay,
    g += weight_decay * param first; with maximize, g = -g before that.
    """
    g = _signed(grad, maximize)
    if weight_decay != 0:
        g = g + weight_decay * param
    np.add(momentum * momentum_buffer, (1 - momentum) * g, out=momentum_buffer)
    param -= lr * momentum_buffer


# section: RMSprop ------------------------------------------------------------

def rmsprop_update(param: np.ndarray, grad: np.ndarray, square_avg: np.ndarray,
                   grad_avg: Optional[np.ndarray], momentum_buffer: Optional[np.ndarray], *,
                   lr: float, alpha: float, eps: float, weight_decay: float, momentum: float,
                   centered: bool, maximize: bool) -> None:
    """torch.optim.RMSprop for one parameter (eps OUTSIDE the square root).

    v = alpha * v + (1 - alpha) * g**2; centered: gbar = alpha * gbar +
    (1 - alpha) * g, denom = sqrt(v - gbar**2) + eps, else denom = sqrt(v) + eps;
    momentum > 0: b = momentum * b + g / denom, param -= lr * b;
    else param -= lr * g / denom.

    `grad_avg` is required when centered, `momentum_buffer` when momentum > 0.
    """
    g = _signed(grad, maximize)
    if weight_decay != 0:
        g = g + weight_decay * param
    np.add(alpha * square_avg, (1 - alpha) * (g * g), out=square_avg)
    if centered:
        np.add(alpha * grad_avg, (1 - alpha) * g, out=grad_avg)
        denom = np.sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        denom = np.sqrt(square_avg) + eps
    if momentum > 0:
        np.add(momentum * momentum_buffer, g / denom, out=momentum_buffer)
        param -= lr * momentum_buffer
    else:
        param -= lr * (g / denom)


# section: Adam and AdamW -----------------------------------------------------

def _decayed_grad(param: np.ndarray, grad: np.ndarray, lr: float, weight_decay: float,
                  decoupled_weight_decay: bool, maximize: bool) -> np.ndarray:
    """The gradient of the Adam family after weight decay: L2 adds
    weight_decay * param to it; decoupled (AdamW) decay scales param by
    1 - lr * weight_decay in place instead."""
    g = _signed(grad, maximize)
    if weight_decay != 0:
        if decoupled_weight_decay:
            param *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * param
    return g


def _adam_moments(exp_avg: np.ndarray, exp_avg_sq: np.ndarray, g: np.ndarray,
                  beta1: float, beta2: float) -> None:
    """m = beta1 * m + (1 - beta1) * g; v = beta2 * v + (1 - beta2) * g**2, in place."""
    np.add(beta1 * exp_avg, (1 - beta1) * g, out=exp_avg)
    np.add(beta2 * exp_avg_sq, (1 - beta2) * (g * g), out=exp_avg_sq)


def adam_update(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                max_exp_avg_sq: Optional[np.ndarray], *, step: int, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                bias_correction: bool = True, decoupled_weight_decay: bool = False) -> None:
    """torch.optim.Adam / AdamW for one parameter.

    L2 decay: g += weight_decay * param (decoupled, AdamW: param *= 1 - lr *
    weight_decay, before the moments); m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * g**2; amsgrad: vmax = max(vmax, v), used
    below instead of v;
    param -= (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps),
    or without bias correction param -= lr * m / (sqrt(v) + eps).
    """
    g = _decayed_grad(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
    _adam_moments(exp_avg, exp_avg_sq, g, beta1, beta2)
    second_moment = exp_avg_sq
    if amsgrad:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    if bias_correction:
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = np.sqrt(second_moment) / math.sqrt(bias_correction2) + eps
        param -= (lr / bias_correction1) * exp_avg / denom
    else:
        param -= lr * exp_avg / (np.sqrt(second_moment) + eps)


# section: Adagrad ------------------------------------------------------------

def adagrad_update(param: np.ndarray, grad: np.ndarray, state_sum: np.ndarray, *, step: int,
                   lr: float, lr_decay: float, weight_decay: float, eps: float,
                   maximize: bool) -> None:
    """torch.optim.Adagrad for one parameter.

    g += weight_decay * param; clr = lr / (1 + (t - 1) * lr_decay);
    sum += g**2; param -= clr * g / (sqrt(sum) + eps).
    """
    g = _signed(grad, maximize)
    if weight_decay != 0:
        g = g + weight_decay * param
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum += g * g
    param -= clr * g / (np.sqrt(state_sum) + eps)


# section: Lion ---------------------------------------------------------------

def lion_update(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, *, lr: float,
                beta1: float, beta2: float, weight_decay: float, maximize: bool) -> None:
    """Lion (Chen et al. 2023) for one parameter.

    c = beta1 * m + (1 - beta1) * g; param -= lr * (sign(c) + weight_decay * param);
    m = beta2 * m + (1 - beta2) * g.  sign(0) = 0.
    """
    g = _signed(grad, maximize)
    interpolated = beta1 * exp_avg + (1 - beta1) * g
    direction = np.sign(interpolated)
    if weight_decay != 0:
        direction = direction + weight_decay * param
    param -= lr * direction
    np.add(beta2 * exp_avg, (1 - beta2) * g, out=exp_avg)


# section: NAdam, RAdam, Adadelta, Adamax ------------------------------------

def nadam_update(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                 *, step: int, mu_product: float, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, momentum_decay: float,
                 decoupled_weight_decay: bool, maximize: bool) -> float:
    """torch.optim.NAdam for one parameter; returns the new mu_product.

    L2: g += weight_decay * param (decoupled: param *= 1 - lr * weight_decay);
    mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay)), mu_{t+1} likewise;
    mu_product *= mu_t; m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * g**2; denom = sqrt(v / (1 - beta2**t)) + eps;
    param -= lr (1 - mu_t) / (1 - mu_product) * g / denom
           + lr mu_{t+1} / (1 - mu_product * mu_{t+1}) * m / denom.
    """
    g = _decayed_grad(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product = mu_product * mu
    _adam_moments(exp_avg, exp_avg_sq, g, beta1, beta2)
    denom = np.sqrt(exp_avg_sq / (1 - beta2 ** step)) + eps
    param -= (lr * (1 - mu) / (1 - mu_product)) * g / denom
    param -= (lr * mu_next / (1 - mu_product * mu_next)) * exp_avg / denom
    return mu_product


def radam_rectification(step: int, beta2: float) -> Optional[float]:
    """RAdam's variance rectification r_t, or None while rho_t <= 5 (the
    variance of the adaptive rate is intractable; the update is then plain
    momentum).  rho_inf = 2 / (1 - beta2) - 1,
    rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t),
    r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))."""
    bias_correction2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
    if not rho_t > 5.0:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def radam_update(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                 *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, decoupled_weight_decay: bool, maximize: bool) -> None:
    """torch.optim.RAdam for one parameter.

    Decay and moments as Adam; m_hat = m / (1 - beta1**t); with r_t from
    `radam_rectification`: param -= lr * m_hat * r_t * sqrt(1 - beta2**t) /
    (sqrt(v) + eps), or param -= lr * m_hat while rho_t <= 5.
    """
    g = _decayed_grad(param, grad, lr, weight_decay, decoupled_weight_decay, maximize)
    _adam_moments(exp_avg, exp_avg_sq, g, beta1, beta2)
    corrected = exp_avg / (1 - beta1 ** step)
    rectification = radam_rectification(step, beta2)
    if rectification is None:
        param -= corrected * lr
    else:
        adaptive = math.sqrt(1 - beta2 ** step) / (np.sqrt(exp_avg_sq) + eps)
        param -= corrected * lr * adaptive * rectification


def adadelta_update(param: np.ndarray, grad: np.ndarray, square_avg: np.ndarray,
                    acc_delta: np.ndarray, *, lr: float, rho: float, eps: float,
                    weight_decay: float, maximize: bool) -> None:
    """torch.optim.Adadelta for one parameter.

    g += weight_decay * param; s = rho * s + (1 - rho) * g**2;
    delta = sqrt(a + eps) / sqrt(s + eps) * g; a = rho * a + (1 - rho) * delta**2;
    param -= lr * delta.
    """
    g = _signed(grad, maximize)
    if weight_decay != 0:
        g = g + weight_decay * param
    np.add(rho * square_avg, (1 - rho) * (g * g), out=square_avg)
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * g
    np.add(rho * acc_delta, (1 - rho) * (delta * delta), out=acc_delta)
    param -= lr * delta


def adamax_update(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_inf: np.ndarray,
                  *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, maximize: bool) -> None:
    """torch.optim.Adamax for one parameter.

    g += weight_decay * param; m = beta1 * m + (1 - beta1) * g;
    u = max(beta2 * u, |g| + eps) (nan propagates); param -= lr / (1 - beta1**t) * m / u.
    """
    g = _signed(grad, maximize)
    if weight_decay != 0:
        g = g + weight_decay * param
    np.add(beta1 * exp_avg, (1 - beta1) * g, out=exp_avg)
    np.maximum(beta2 * exp_inf, np.abs(g) + eps, out=exp_inf)
    param -= (lr / (1 - beta1 ** step)) * (exp_avg / exp_inf)


# section: weight averaging ---------------------------------------------------

def lerp_(averages: List[np.ndarray], currents: List[np.ndarray], weight: float) -> None:
    """averages[i] += weight * (currents[i] - averages[i]) IN PLACE, torch.lerp's
    form: from the average when |weight| < 0.5, else
    currents[i] - (currents[i] - averages[i]) * (1 - weight)."""
    for average, current in zip(averages, currents):
        difference = current - average
        if abs(weight) < 0.5:
            average += weight * difference
        else:
            average[...] = current - difference * (1 - weight)


# section: gradient clipping --------------------------------------------------

def grad_norm(grads: Iterable[np.ndarray], norm_type: float = 2.0) -> float:
    """Global norm of several gradients, accumulated in float64.

    norm_type 2: sqrt(sum of squares over every element of every gradient);
    norm_type inf: the largest absolute value (nan if any is nan).  0.0 for
    no gradients.
    """
    grads = list(grads)
    if math.isinf(norm_type):
        largest = [float(np.max(np.abs(g))) for g in grads if g.size]
        if any(math.isnan(value) for value in largest):
            return math.nan
        return max(largest, default=0.0)
    total = 0.0
    for g in grads:
        flat = g.astype(np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_grad_norm(grads: List[np.ndarray], max_norm: float, norm_type: float = 2.0) -> float:
    """torch.nn.utils.clip_grad_norm_ on arrays: scale every gradient IN PLACE by
    coef = max_norm / (norm + 1e-6) when coef < 1.  Returns the norm before
    clipping."""
    norm = grad_norm(grads, norm_type)
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for g in grads:
            g *= coef
    return norm
