"""Quantify the knowledge in a detector's features: per-cell input entropy and visual concepts.

Method (Cheng, Rao, Chen, Zhang, "Explaining Knowledge Distillation by Quantifying the Knowledge",
CVPR 2020). For one image x (B=1 here; batches are independent problems solved together) and a
feature f(x) ∈ R^D of a model, perturb the input with independent Gaussian noise whose standard
deviation σ_u is shared by all pixels and channels of one *unit* u (a ``cell``×``cell`` square of
input pixels; ``cell=1`` is per pixel)::

    x̃ = x + σ_{u(p)} · z_{p,c},   z ~ N(0, 1) per pixel p and channel c

and find the largest perturbation that leaves the feature nearly unchanged, i.e. minimise

    L(σ) = E_z ‖f(x̃) − f(x)‖² / s_f²  −  λ · (1/P) Σ_p log σ_{u(p)}

with s_f² = ‖f(x) − mean(f(x))‖² (the feature's spread over its D entries, so the first term is the
*relative* squared change, scale-free) and P = H·W the number of pixels. This is the paper's
Lagrangian form of "maximise the entropy of the perturbation subject to a bound on the expected
feature change"; our λ is the paper's λ times P (we average the entropy over pixels instead of
summing it), so one λ fits every image size and every ``cell``. For a feature that is locally
linear in the input, the optimum puts λ·n_u/(2P) of relative change into every unit u the feature
reads (n_u = the unit's pixels), e.g. f(x) = x ⊙ m gives σ_u² = λ·s_f²·n_u/(2·P·c_u) where c_u
counts the unit's unmasked pixel-channels; units the feature ignores grow until the clamp σ_max.
So λ/2 bounds the total relative change E‖Δf‖²/s_f² at the optimum (reached when f reads every
unit); the default λ = 0.01 keeps it below 0.5 %, the small-perturbation regime.

Optimisation: σ = exp(θ) (θ unconstrained), the expectation estimated with ``samples`` noise draws
per step (reparameterised, so gradients flow through z·σ), Adam on θ, θ projected onto
[log σ_min, log σ_max] after every step (σ_max = 1 is the whole 0-1 intensity range: noise beyond
it carries no more meaning).

Entropy of unit u: the differential entropy of its Gaussian noise per input element,
``H_u = log σ_u + ½·log(2πe)`` (nats; averaged, not summed, over the unit's pixels and channels,
which share σ_u, so units of any size compare). Low entropy = the feature cannot tolerate noise
there = the network relies on that region; high entropy = the information there is discarded.

Visual concepts: a unit u is a concept when ``H̄ − H_u > b`` (b = 0.2 nats by default) with H̄ the
mean entropy of the *background* units (the paper's baseline; ``baseline='all'`` uses every unit).
Foreground units overlap a ground-truth box (mapped through the letterbox); background units are
the rest of the image; units lying entirely in letterbox padding are neither (they are not image
content) and take no part in H̄ or the counts. Per image: N_fg, N_bg (concepts on foreground /
background) and their ratio N_fg / (N_fg + N_bg) (the paper's λ; ``ratio`` here to keep λ for the
Lagrange weight). A model's numbers are the mean and sample std (ddof=1) over the images.

Learning dynamics (epoch checkpoints): with S_j the set of (image, unit) foreground concepts of the
epoch-j model and M the last epoch, ``stability = |S_M| / |⋃_j S_j|`` (1 = nothing learned on the
way was discarded, the paper's ratio) and per epoch ``retention_j = |S_j ∩ S_M| / |S_M|`` (the share
of the final model's foreground concepts already present at epoch j).

The stages, one module each: ``entropy`` (settings, learning σ) and ``features`` (f(x) through
hooks); ``concepts`` (unit masks, counts, summaries) and ``samples`` (letterboxed images);
``per_model`` (one model on the images, epoch checkpoints, dynamics); ``report`` (tables, JSON) and
``plots`` (figures); ``run`` (:func:`run_analysis`, what ``analyze_kd.py`` calls). Import the names
from this package.
"""

from analysis.knowledge.concepts import BASELINES, ConceptCount, box_cell_mask, count_concepts, summarize
from analysis.knowledge.entropy import (
    HALF_LOG_2PI_E,
    EntropyResult,
    EntropySettings,
    expand_units,
    grid_shape,
    learn_entropy,
)
from analysis.knowledge.features import FeatureExtractor
from analysis.knowledge.per_model import ModelKnowledge, analyze_model, concept_dynamics, epoch_checkpoints
from analysis.knowledge.plots import plot_dynamics, plot_entropy_maps
from analysis.knowledge.report import dynamics_table, markdown_table
from analysis.knowledge.run import run_analysis
from analysis.knowledge.samples import Sample, load_samples

__all__ = [
    "BASELINES",
    "HALF_LOG_2PI_E",
    "ConceptCount",
    "EntropyResult",
    "EntropySettings",
    "FeatureExtractor",
    "ModelKnowledge",
    "Sample",
    "analyze_model",
    "box_cell_mask",
    "concept_dynamics",
    "count_concepts",
    "dynamics_table",
    "epoch_checkpoints",
    "expand_units",
    "grid_shape",
    "learn_entropy",
    "load_samples",
    "markdown_table",
    "plot_dynamics",
    "plot_entropy_maps",
    "run_analysis",
    "summarize",
]
