"""Conditional steering: per prompt, once at prefill, a gate decides whether and how to steer.

A *gate* (:mod:`.base`) gives every prompt a harmfulness score in ``[0, 1]`` and a category code
(``1..C``, the class codes of :class:`~sae_refusal.features.vectors.SteeringVectors`; ``0`` where the gate
names no harmful category). A :class:`GatePolicy` (:mod:`.policy`) maps the score to a signed alpha
(harmful-looking prompts get ``+alpha_pos`` along their vector, more refusal; benign-looking ones
``-alpha_neg``, less over-refusal; the unsure middle band ``alpha_mid``, default 0 = untouched) and
:class:`GatedSteering` (:mod:`.steering`) bundles gate, policy, vectors and the steering layer into per-row
edits for :func:`~sae_refusal.steer.scoring.first_token_decisions` or an
:class:`~sae_refusal.steer.interventions.Intervention` around ``generate``, and saves / loads them
(:func:`load_gate`). :func:`gate_metrics` (:mod:`.metrics`) scores a gate's calls on held-out prompts.

Gates (all follow the :class:`Gate` protocol; the residual ones share :mod:`.residual` and are fitted on
TRAIN-split activations):

* :class:`RefusalTokenGate` (:mod:`.refusal_token`): the refusal-token model's own unsteered first token.
  A category token gives score 1 and that category, ``[respond]`` score 0 (``graded=True``: the score is
  ``1 - P(respond)``).
* :class:`ProbeGate` (:mod:`.probe`): logistic regression (scikit-learn) on standardised last-token
  residuals at one layer, harmful vs benign; score ``P(harmful)``; category from a multinomial head on the
  harmful rows (``category="head"``) or the nearest category mean (``category="mean"``).
* :class:`HeadGate` (:mod:`.head`): the project's L1 multinomial head (:mod:`sae_refusal.features.heads`) on
  SAE codes, score ``1 - P(benign)``, category the most likely harmful class.
* :class:`DistanceGate` (:mod:`.distance`): ``s_c = d_B / (d_B + d_c)`` with ``d_B``, ``d_c`` the distances
  to the benign and category-``c`` means (residual space, or SAE latent space when an SAE is given); score
  ``max_c s_c``, category its argmax.
* :class:`GuardGate` (:mod:`.guard`): an external guard model: a local sequence classifier
  (``mode="classifier"``, the label index meaning harmful set by ``harmful_label``) or a chat model whose
  next-token logits of two answers (``"unsafe"`` / ``"safe"``) after ``prompt_format`` give the score
  (``mode="chat"``). It names no category.
* :class:`MultiLayerProbeGate` (:mod:`.multilayer`): a :class:`ProbeGate` on the concatenated last-token
  residuals of several layers (one early-exit pass); :attr:`layer` is the deepest of them.
* :class:`CalibratedGate` (:mod:`.calibrated`): any gate with its score mapped through a monotone
  calibration (Platt or isotonic) fitted on VALIDATION scores, so thresholds read as probabilities.
* :class:`EnsembleGate` (:mod:`.ensemble`): member gates combined by a rule for disagreement (weighted
  ``"mean"``, ``"all"`` = min, ``"any"`` = max); category of the first member naming one.

Gates that hold gates (calibrated, ensemble) save them nested (:mod:`.nested`).

The design notes live with the code they describe: category codes in :mod:`.base`, the global vector in
:mod:`.policy`, the two passes and the artifact in :mod:`.steering`.
"""

from sae_refusal.steer.gates.base import Gate, GateScores
from sae_refusal.steer.gates.calibrated import CalibratedGate
from sae_refusal.steer.gates.distance import DistanceGate
from sae_refusal.steer.gates.ensemble import EnsembleGate
from sae_refusal.steer.gates.guard import GuardGate
from sae_refusal.steer.gates.head import HeadGate
from sae_refusal.steer.gates.metrics import GateMetrics, gate_metrics
from sae_refusal.steer.gates.multilayer import MultiLayerProbeGate
from sae_refusal.steer.gates.policy import GatePolicy, global_vector, row_vectors
from sae_refusal.steer.gates.policy import VectorMode as VectorMode
from sae_refusal.steer.gates.probe import ProbeGate
from sae_refusal.steer.gates.refusal_token import RefusalTokenGate
from sae_refusal.steer.gates.residual import prompt_residuals
from sae_refusal.steer.gates.steering import GATE_FILE, GATE_TENSORS_FILE, GatedSteering, load_gate
from sae_refusal.steer.gates.steering import GATE_LOADERS as GATE_LOADERS

__all__ = [
    "GATE_FILE",
    "GATE_TENSORS_FILE",
    "CalibratedGate",
    "DistanceGate",
    "EnsembleGate",
    "Gate",
    "GateMetrics",
    "GatePolicy",
    "GateScores",
    "GatedSteering",
    "GuardGate",
    "HeadGate",
    "MultiLayerProbeGate",
    "ProbeGate",
    "RefusalTokenGate",
    "gate_metrics",
    "global_vector",
    "load_gate",
    "prompt_residuals",
    "row_vectors",
]
