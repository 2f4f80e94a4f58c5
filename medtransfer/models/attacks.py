"""L∞ adversarial attacks (FGSM, PGD) on a model's [0, 1] image input.

Pure model and tensor operations, so both evaluation (robustness under attack) and training
(adversarial training) use the same code. The gradient is taken with ``tf.GradientTape``
through the whole model, in-graph preprocessing (resize, channel adapter, the backbone's
normalisation) included: the perturbation lives in the pixel units a scanner or a file would
carry, and ``epsilon`` is in those units (2/255 is two grey levels of an 8-bit image).

The model is called with ``training=False`` while the attack searches: its weights are frozen,
Dropout is off and BatchNormalization uses its moving statistics, so searching neither changes
the model (BatchNormalization would otherwise update its statistics at every step) nor sees a
different function from the one being attacked.

FGSM (Goodfellow et al. 2015) is one step of size ``epsilon`` along the sign of the gradient
from the clean image; PGD (Madry et al. 2018) starts at a random point of the ε-ball (unless
told not to) and takes ``steps`` signed steps of ``step_size``, projecting back onto the ε-ball
and [0, 1] after each. Both ascend the loss against the true label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import tensorflow as tf

AttackMethod = Literal["fgsm", "pgd"]
# Madry et al.'s step: 2.5 * epsilon / steps lets PGD reach the ball's border from any start.
STEP_SIZE_FACTOR = 2.5

Loss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


@dataclass(frozen=True)
class Attack:
    """One attack's settings; ``step_size`` None means ``2.5 * epsilon / steps`` for PGD.

    FGSM is a single step of size ``epsilon`` from the clean image: ``steps``, ``step_size``
    and ``random_start`` do not apply to it (``attack_steps`` says what runs)."""

    method: AttackMethod
    epsilon: float
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("fgsm", "pgd"):
            raise ValueError(f"method must be fgsm or pgd, got {self.method!r}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon must be in [0, 1] (pixel units), got {self.epsilon}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")

    @property
    def attack_steps(self) -> int:
        return 1 if self.method == "fgsm" else self.steps

    @property
    def step(self) -> float:
        """The size of each signed step."""
        if self.method == "fgsm":
            return self.epsilon
        if self.step_size is not None:
            return self.step_size
        return STEP_SIZE_FACTOR * self.epsilon / self.steps

    @property
    def starts_at_random(self) -> bool:
        return self.method == "pgd" and self.random_start

    def to_json(self) -> dict:
        """What a report records: the settings as run (steps and step size resolved)."""
        return {
            **asdict(self),
            "steps": self.attack_steps,
            "step_size": self.step,
            "random_start": self.starts_at_random,
        }


def input_gradient(model: Callable, loss: Loss, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """d loss(y, model(x)) / d x, the model in inference mode (frozen weights, moving
    BatchNormalization statistics, no Dropout)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(y, model(x, training=False))
    return tape.gradient(value, x)


def project(x_adv: tf.Tensor, x: tf.Tensor, epsilon: tf.Tensor | float) -> tf.Tensor:
    """The nearest image to ``x_adv`` within the L∞ ε-ball around ``x`` and within [0, 1]."""
    return tf.clip_by_value(tf.clip_by_value(x_adv, x - epsilon, x + epsilon), 0.0, 1.0)


def perturb(
    model: Callable,
    loss: Loss,
    x: tf.Tensor,
    y: tf.Tensor,
    attack: Attack,
    seed: tf.Tensor | tuple[int, int] = (0, 0),
) -> tf.Tensor:
    """Adversarial versions of the images ``x`` (float32 [N, H, W, C] in [0, 1]) against the
    labels ``y``: FGSM or PGD as ``attack`` says; ``seed`` (stateless, two integers) draws
    PGD's random start. An epsilon of 0 returns ``x`` unchanged."""
    return search(
        model,
        loss,
        x,
        y,
        epsilon=attack.epsilon,
        step=attack.step,
        steps=attack.attack_steps,
        random_start=attack.starts_at_random,
        seed=seed,
    )


def search(
    model: Callable,
    loss: Loss,
    x: tf.Tensor,
    y: tf.Tensor,
    *,
    epsilon: tf.Tensor | float,
    step: tf.Tensor | float,
    steps: tf.Tensor | int,
    random_start: tf.Tensor | bool,
    seed: tf.Tensor | tuple[int, int],
) -> tf.Tensor:
    """The signed-gradient ascent behind ``perturb``, every setting a tensor or a number, so
    one ``tf.function`` around it serves every epsilon and method without tracing again.

    ``random_start`` false starts at ``x`` (the noise is drawn and scaled by 0, which keeps
    one graph for both)."""
    x = tf.convert_to_tensor(x, tf.float32)
    epsilon = tf.cast(epsilon, tf.float32)
    step = tf.cast(step, tf.float32)
    noise = tf.random.stateless_uniform(
        tf.shape(x), seed=tf.cast(seed, tf.int64), minval=-1.0, maxval=1.0, dtype=tf.float32
    )
    start = project(x + tf.cast(random_start, tf.float32) * epsilon * noise, x, epsilon)

    def ascend(i: tf.Tensor, x_adv: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        gradient = input_gradient(model, loss, x_adv, y)
        return i + 1, project(x_adv + step * tf.sign(gradient), x, epsilon)

    steps = tf.cast(steps, tf.int32)
    _, adversarial = tf.while_loop(lambda i, _: i < steps, ascend, (tf.constant(0), start))
    return tf.stop_gradient(adversarial)
