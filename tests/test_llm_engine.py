"""The fast engine gives the hf engine's greedy tokens under every intervention kind (float32, CPU).

On the CPU the fast engine runs the static generator's ``"static"`` mode: the fixed-shape decode step a CUDA
graph captures, run eagerly, with the hooks fed from the generator's buffers and fixed-address slots.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from sae_refusal.llm import engine as engine_module
from sae_refusal.llm.batched import BatchContext
from sae_refusal.llm.engine import fast_unsupported, generate, resolve_engine, sequence_bias_vector
from sae_refusal.llm.fast_generate import (
    STOP_CHECK_EVERY,
    StaticGenerator,
    cache_length,
    grouped_decode_attention,
)
from sae_refusal.llm.hooks import StepContext
from sae_refusal.llm.layers import decoder_layers
from sae_refusal.llm.tokenize import pad_left
from sae_refusal.sae.topk import TopKSAE
from sae_refusal.steer.interventions import (
    DirectionAblation,
    Intervention,
    LatentAblation,
    LatentSteering,
    ResidualSteering,
)
from sae_refusal.steer.positions import Positions
from sae_refusal.steer.scoring import residual_rows
from sae_refusal.testing import build_tiny_model

VOCAB, D, LAYER, NEW, BATCH = 120, 32, 1, 8, 3
#: Prompt lengths: padding in every batch, and a last batch smaller than BATCH (7 prompts, batches of 3).
LENGTHS = (5, 9, 2, 7, 12, 4, 6)
#: Per-row gate alphas: rows at 0 beside steered rows, and (length-sorted) a first batch all at 0.
GATE_ALPHAS = (1.0, 0.0, -1.0, 0.0, 0.0, 0.5, 2.0)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    tiny = build_tiny_model("llama", vocab_size=VOCAB, num_layers=4, hidden_size=D)
    tiny.generation_config.eos_token_id = None
    with torch.no_grad():  # sharper attention than the random init's: token positions then matter
        for block in decoder_layers(tiny):
            block.self_attn.q_proj.weight.mul_(12.0)
            block.self_attn.k_proj.weight.mul_(12.0)
    return tiny


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]


def _vector(seed: int, *shape: int, scale: float = 0.05) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gate_around(model: nn.Module, positions: Positions = "all") -> BatchContext:
    """The eval gate's ``around``: per-row vectors and alphas; a batch with all alphas 0 is left alone."""
    alpha_N = torch.tensor(GATE_ALPHAS)
    rows = residual_rows(LAYER, _vector(6, len(LENGTHS), D), alpha_N, positions=positions)

    def around(indices: list[int]) -> AbstractContextManager[Any]:
        if not bool((alpha_N[torch.tensor(indices)] != 0).any()):
            return nullcontext()
        return Intervention(model, rows(indices))

    return around


#: ``kind@positions`` -> ``kind`` and its :data:`Positions` (``all`` when not given).
_POSITIONS: dict[str, Positions] = {"all": "all", "prompt": "prompt", "generated": "generated", "4": 4}


def _around(case: str, model: nn.Module) -> BatchContext | None:
    kind, _, where = case.partition("@")
    positions = _POSITIONS[where or "all"]
    sae = TopKSAE(D, 64, 8, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Callable[[], Any]] = {
        "residual": lambda: {LAYER: ResidualSteering(_vector(4, D), 1.0, positions=positions)},
        "latent": lambda: {LAYER: LatentSteering(sae, _vector(5, 64, scale=1.0), 0.02, positions=positions)},
        "latent_ablation": lambda: {LAYER: LatentAblation(sae, list(range(0, 64, 2)), positions=positions)},
        # the eval's ablation: the direction projected out after every block from LAYER on
        "ablation": lambda: dict.fromkeys(
            range(LAYER, len(decoder_layers(model))), DirectionAblation(_vector(4, D), positions=positions)
        ),
    }
    if kind == "none":
        return None
    if kind == "gate":
        return _gate_around(model, positions)
    edits = fns[kind]()
    return lambda _indices: Intervention(model, edits)


def _ids(model: nn.Module, prompts: list[list[int]], engine: str, **kwargs: Any) -> list[list[int]]:
    options: dict[str, Any] = {"max_new_tokens": NEW, "pad_id": 0, "stop_ids": [], "batch_size": BATCH}
    out = generate(model, prompts, engine=engine, **(options | kwargs))
    return [g.token_ids for g in out]


#: Every eval intervention kind (and SAE latent ablation), each at every ``positions`` value.
KINDS = ["none"] + [
    f"{kind}@{where}"
    for kind in ("residual", "latent", "latent_ablation", "ablation", "gate")
    for where in _POSITIONS
]


@pytest.mark.parametrize("sort_by_length", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_engine_gives_the_hf_tokens(
    model: nn.Module, prompts: list[list[int]], kind: str, sort_by_length: bool
) -> None:
    around = _around(kind, model)
    hf = _ids(model, prompts, "hf", around=around, sort_by_length=sort_by_length)
    fast = _ids(model, prompts, "fast", around=around, sort_by_length=sort_by_length)
    assert fast == hf
    if kind != "none":  # the intervention matters, so equal tokens say something
        assert hf != _ids(model, prompts, "hf", sort_by_length=sort_by_length)


def test_gate_rows_at_alpha_zero_stay_unsteered(model: nn.Module, prompts: list[list[int]]) -> None:
    plain = _ids(model, prompts, "fast", sort_by_length=True)
    gated = _ids(model, prompts, "fast", around=_gate_around(model), sort_by_length=True)
    for alpha, before, after in zip(GATE_ALPHAS, plain, gated, strict=True):
        if alpha == 0:
            assert after == before
    assert any(before != after for before, after in zip(plain, gated, strict=True))


class _CountingSteer:
    """A capturable residual edit that counts how often its per-batch tensor is built."""

    static_key: Hashable = ("counting",)

    def __init__(self, vector_BD: Tensor) -> None:
        self.vector_BD, self.builds, self.rows_seen = vector_BD, 0, [0]

    def build(self) -> Tensor:
        self.builds += 1
        return self.vector_BD.clone()

    def __call__(self, hidden_BTD: Tensor, ctx: StepContext) -> Tensor:
        self.rows_seen.append(hidden_BTD.shape[0])
        held = ctx.static.hold(self.build) if ctx.static is not None else self.build()
        return hidden_BTD + held[:, None, :]


def _steering(model: nn.Module, edit: _CountingSteer) -> BatchContext:
    return lambda _indices: Intervention(model, {LAYER: edit})


def test_decode_steps_read_fixed_slots_and_share_a_signature(
    model: nn.Module, prompts: list[list[int]]
) -> None:
    """What keeps one captured graph valid across batches: decode steps read the prefill's slots only, the
    slots keep their addresses, and batches with the same hooks and rows share a signature."""
    ids_BT, mask_BT = pad_left(prompts[:3], 0)
    signatures, addresses, values = [], [], []
    with StaticGenerator(model, batch_size=3, max_cache_len=32) as generator:
        for seed in (1, 2):
            edit = _CountingSteer(_vector(seed, 3, D))
            generator(ids_BT, mask_BT, NEW, around=_steering(model, edit))
            assert edit.builds == 1  # in the prefill; the NEW - 1 decode steps read the slot
            signatures.append(generator.static.signature)
            (slot,) = generator.static.held
            addresses.append(slot.data_ptr())
            values.append(slot.clone())
        assert signatures[0] == signatures[1] and addresses[0] == addresses[1]
        assert torch.equal(values[1], _vector(2, 3, D))  # the second batch's values, in the first's slot
        edit = _CountingSteer(_vector(3, 2, D))
        generator(ids_BT[:2], mask_BT[:2], NEW, around=lambda _i: Intervention(model, {LAYER: edit}))
        assert set(edit.rows_seen[1:]) == {2}  # the fill row never reaches the hook
        assert generator.static.signature != signatures[0]  # fewer real rows: another graph


def test_uncapturable_hooks_still_get_the_right_context(model: nn.Module, prompts: list[list[int]]) -> None:
    """A plain function (no ``static_key``) in a static step: same tokens as with ``generate``."""
    vector_D = _vector(4, D)

    def steer_generated(hidden_BTD: Tensor, ctx: StepContext) -> Tensor:
        where_BT = ctx.real_BT & ctx.generated_BT & (ctx.token_index_BT >= 6)
        return torch.where(where_BT[..., None], hidden_BTD + vector_D, hidden_BTD)

    def around(_indices: list[int]) -> Intervention:
        return Intervention(model, {LAYER: steer_generated})

    assert _ids(model, prompts, "fast", around=around) == _ids(model, prompts, "hf", around=around)
    assert _ids(model, prompts, "hf", around=around) != _ids(model, prompts, "hf")


@contextmanager
def _generation_config(model: nn.Module, **values: Any) -> Iterator[None]:
    config = model.generation_config
    before = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(config, name, value)


def test_respond_bias_in_the_generation_config(model: nn.Module, prompts: list[list[int]]) -> None:
    plain = _ids(model, prompts, "hf")
    token = plain[0][1]
    with _generation_config(model, sequence_bias=[[[token], 4.0]]):
        bias_V = sequence_bias_vector(model)
        assert bias_V is not None and float(bias_V[token]) == 4.0
        hf = _ids(model, prompts, "hf")
        assert hf != plain
        assert _ids(model, prompts, "fast") == hf


def test_eos_of_the_config_without_stop_ids(model: nn.Module, prompts: list[list[int]]) -> None:
    """No ``stop_ids``: ``batched.generate`` passes ``eos_token_id=None`` (the config's EOS ids do not stop
    rows), and the fast engine runs every row to ``max_new_tokens`` as well."""
    plain = _ids(model, prompts, "hf")
    eos = plain[1][2]
    with _generation_config(model, eos_token_id=eos):
        hf = _ids(model, prompts, "hf")
        assert _ids(model, prompts, "fast") == hf == plain


def test_stop_ids_cut_and_end_early(model: nn.Module, prompts: list[list[int]]) -> None:
    new = 20
    plain = _ids(model, prompts, "hf", max_new_tokens=new)
    options: dict[str, Any] = {"max_new_tokens": new, "pad_id": 0, "batch_size": BATCH}
    # one stop token that ends row 0 at once while other rows run past the first stop check
    stop = plain[0][1]
    assert any(stop not in row[: STOP_CHECK_EVERY + 1] for row in plain)
    hf = generate(model, prompts, stop_ids=[stop], engine="hf", **options)
    assert generate(model, prompts, stop_ids=[stop], engine="fast", **options) == hf
    assert hf[0].stopped and not all(g.stopped for g in hf)
    # every row stops early: the same cut answers, and the batch ends at the first check after that
    stops = sorted({row[1] for row in plain} | {row[3] for row in plain})
    hf = generate(model, prompts, stop_ids=stops, engine="hf", **options)
    assert generate(model, prompts, stop_ids=stops, engine="fast", **options) == hf
    ids_BT, mask_BT = pad_left(prompts[:3], 0)
    with StaticGenerator(model, batch_size=3, max_cache_len=40) as generator:
        assert generator(ids_BT, mask_BT, new, stop_ids=stops).shape == (3, STOP_CHECK_EVERY + 1)
        assert generator(ids_BT, mask_BT, new).shape == (3, new)


def test_what_the_fast_engine_cannot_reproduce(model: nn.Module, prompts: list[list[int]]) -> None:
    with _generation_config(model, repetition_penalty=1.3):
        assert fast_unsupported(model) == "generation_config.repetition_penalty = 1.3"
        with pytest.raises(ValueError, match=r"engine: 'fast' cannot reproduce.*repetition_penalty"):
            _ids(model, prompts, "fast")
    with pytest.raises(ValueError, match="temperature"):
        generate(
            model,
            prompts,
            max_new_tokens=2,
            pad_id=0,
            stop_ids=[],
            batch_size=2,
            temperature=0.7,
            engine="fast",
        )
    assert fast_unsupported(model) is None
    model.is_quantized = True  # type: ignore[assignment]
    try:
        assert fast_unsupported(model) == "a quantized model (its kernels are not known to be capturable)"
    finally:
        del model.is_quantized
    assert resolve_engine("auto", model) == "hf"  # on the CPU
    assert resolve_engine("fast", model) == "fast"
    with pytest.raises(ValueError, match=r"^engine: expected one of hf, fast, auto, got 'turbo'$"):
        _ids(model, prompts, "turbo")


def test_auto_takes_fast_on_cuda_only(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import sae_refusal.llm.layers as layers

    monkeypatch.setattr(layers, "input_device", lambda _model: torch.device("cuda"))
    assert resolve_engine("auto", model) == "fast"
    assert resolve_engine("hf", model) == "hf"


def test_cache_length_buckets() -> None:
    assert [cache_length(n) for n in (1, 64, 65, 96, 97, 130, 300, 520)] == [
        64,
        64,
        96,
        96,
        128,
        192,
        384,
        768,
    ]
    assert cache_length(300, most=320) == 320
    assert cache_length(300, most=200) == 300  # never below the need


def test_engine_module_exports() -> None:
    assert engine_module.ENGINES == ("hf", "fast", "auto")


@pytest.mark.parametrize("q_len", [1, 3])
def test_grouped_decode_attention_is_eager_attention(q_len: int) -> None:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, kv_len, head_dim = 2, 6, 2, 9, 8
    query = torch.randn(batch, q_len, heads, head_dim, generator=generator).transpose(1, 2)
    key = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    allowed = torch.rand(batch, 1, q_len, kv_len + 2, generator=generator) > 0.3
    allowed[..., 0] = True
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads  # type: ignore[assignment]
    module.training = False
    expected, _ = eager_attention_forward(module, query, key, value, mask[..., :kv_len], scaling=0.3)
    got, weights = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    assert weights is None and got.shape == (batch, q_len, heads, head_dim)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        grouped_decode_attention(module, query, key, value, mask, dropout=0.1)
