"""The convergence doctor: :class:`ConvergenceDoctor`, a Lightning callback that explains why a cross-entropy loss
does not go down.

The doctor watches logits, targets, inputs, losses and gradient norms during ``Trainer.fit`` and records
*findings*: a stable ``code``, a severity, where it happened, the evidence numbers and a message that names a
concrete fix. It is cheap enough to leave on (on-device accumulation, no per-step host synchronisation on an
accelerator; the expensive checks run once) and works with any LightningModule that follows this contract:

* ``training_step`` and ``validation_step`` return a dict holding the batch's ``logits`` (``(N, C)`` or
  ``(N, C, d1, ...)``, raw scores, before any softmax) and ``target`` (class indices ``(N[, d1, ...])``, or
  probabilities shaped like the logits), next to the ``loss``. The key names are arguments
  (``logits_key``, ``target_key``, ``loss_key``). A step that returns something else is skipped by the
  logit/target checks; gradient checks still run. A training step that runs several optimiser steps
  (:class:`~xentlit.XentModule`'s ``steps_per_execution``) returns their rows concatenated and ``step_rows``, the
  rows of each optimiser step, so that per-batch statistics still count optimiser batches.
* For the checks made *before* the forward pass (first batch of each stage, and the batch that raised an
  exception), the doctor reads inputs and targets from the batch: through ``pl_module.unpack_batch(batch)`` when
  the module has one (:class:`~xentlit.XentModule` does), else ``batch[batch_input_key]`` /
  ``batch[batch_target_key]`` for a dict batch, else ``batch[0]`` / ``batch[1]``.
* The number of classes comes from the logits, or (before the first forward pass) from ``num_classes``, the
  module's ``num_classes`` attribute or the datamodule's; the ignore index from ``ignore_index`` or the module's
  ``ignore_index`` attribute (default -100). Training class counts come from the datamodule's ``class_counts``
  when it has them, else they are counted from the training targets.

Findings (code: severity, what it means), one check each (:mod:`xentlit.callbacks.doctor.checks`):

========================== ======== ==================================================================
``softmax_before_loss``    error    outputs are probabilities (in [0, 1], rows sum to 1), not logits
``initial_loss``           warning  the untrained model's loss is far above that of uniform predictions
``non_finite_inputs``      error    NaN/inf in the inputs
``unscaled_inputs``        warning  feature scales so large that the first layer saturates
``target_out_of_range``    error    class indices outside ``[0, C)`` that are not the ignore index
``float_class_indices``    error    class indices stored as floats (shape ``(N,)``, whole numbers)
``float_one_hot_targets``  warning  float one-hot rows where class indices were meant
``integer_one_hot_targets`` error   integer one-hot rows ``(N, C)`` instead of class indices ``(N,)``
``unseen_class``           warning  a class never occurs among the training targets
``all_ignored_batch``      warning  training batches whose every target equals the ignore index
``divergence``             error    NaN/inf loss or gradients, or a loss/gradient norm that explodes
``lr_too_low``             warning  loss flat near its initial value while gradients are healthy
``majority_collapse``      warning  predictions concentrate on the majority class, macro-F1 at chance
``overconfidence``         warning  train loss falls while validation loss and overconfidence grow
========================== ======== ==================================================================

Each code is reported once per run: logged as a warning when found, written to ``diagnosis.json`` in
``trainer.default_root_dir`` (rank 0 only) and summarised on stdout at the end of ``fit`` (also when ``fit``
ends with an exception). The gradient norm and the mean max-probability of the training batches are logged
per epoch as ``doctor/grad_norm`` and ``doctor/max_prob``.

On divergence (``stop_on_divergence=True``) the doctor restores the weights of the last healthy epoch
boundary (kept as a CPU copy, or the initial weights during the first epoch), clears the optimiser's state
and sets ``trainer.should_stop``: training ends cleanly and every checkpoint Lightning writes afterwards holds
finite weights, while the checkpoints written before stay as they were.

Cost: per optimiser step the doctor reads the step's loss (one scalar; the gradient norm too on the first steps,
the first step of each epoch and then every ``trainer.log_every_n_steps`` steps) and keeps references to the
step's (already detached) logits and targets; their statistics are computed in chunks (once per epoch for small
problems, or whenever about ``chunk_size`` logits have accumulated), so the number of kernels per step stays
near zero and memory stays bounded. On CPU the per-step loss is read directly (no device to wait for); on
CUDA it is copied asynchronously into pinned memory and read one step later, so the host never waits for the
current step. Epoch statistics are all-reduced once per epoch (one collective, called on every rank), so DDP
cannot deadlock and every rank takes the same decisions. Expensive checks (first batches, initial loss) run
once. Reductions over a short class dimension are written as matrix-vector products where torch's CPU kernels
for them are slow.

Layout: :class:`~xentlit.callbacks.doctor.callback.ConvergenceDoctor` (settings, report, Lightning hooks) hands
each hook to the fit's :class:`~xentlit.callbacks.doctor.examination.Examination`, which gathers what the checks
need and calls the checks of that moment (:mod:`~xentlit.callbacks.doctor.checks`: one class per code,
registered in ``CHECKS``) through :mod:`~xentlit.callbacks.doctor.diagnosis` (each code reported once).
``batch``, ``first_step``, ``statistics``, ``steps`` and ``epoch`` measure what the checks judge
(``observations`` holds what they receive), ``contract`` reads any LightningModule, ``snapshot`` keeps the
weights divergence restores, and ``report`` writes ``diagnosis.json`` and the summary.
"""

from __future__ import annotations

from xentlit.callbacks.doctor.callback import ConvergenceDoctor
from xentlit.callbacks.doctor.checks import CHECKS
from xentlit.callbacks.doctor.findings import Finding
from xentlit.callbacks.doctor.report import DIAGNOSIS_FILE

#: Every finding code with its severity and a one-line title (from the registered checks, in their order).
CODES: dict[str, tuple[str, str]] = {check.code: (check.severity, check.title) for check in CHECKS}

__all__ = ["CHECKS", "CODES", "DIAGNOSIS_FILE", "ConvergenceDoctor", "Finding"]
