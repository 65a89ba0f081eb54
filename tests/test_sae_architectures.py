"""SAE architectures as plain data: ``config()`` is the YAML form, ``architecture_from_config`` its inverse.

A checkpoint keeps ``config()`` and rebuilds the architecture from it, so the round trip must give back the
same class with every setting (nested ``base`` included), missing ``init_args`` must mean the defaults, and a
bad ``class_path`` must fail with the config key in the message.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sae_refusal.sae import L1, Contrastive, SAEArchitecture, TopK, architecture_from_config

MODULE = "sae_refusal.sae.architectures"


def test_config_is_the_class_path_and_every_constructor_argument() -> None:
    assert TopK(k=4, aux_k=8, aux_coef=0.25, dead_after_steps=7).config() == {
        "class_path": f"{MODULE}.TopK",
        "init_args": {
            "k": 4,
            "aux_k": 8,
            "aux_coef": 0.25,
            "dead_after_steps": 7,
            "encoder_dtype": "float32",
        },
    }
    assert L1(l1_coef=0.2, init_decoder_norm=0.3).config() == {
        "class_path": f"{MODULE}.L1",
        "init_args": {"l1_coef": 0.2, "init_decoder_norm": 0.3},
    }
    contrastive = Contrastive(
        L1(l1_coef=0.2), supcon_weight=0.4, separation_weight=0.6, temperature=0.7, ambiguous_as_benign=False
    )
    assert contrastive.config() == {
        "class_path": f"{MODULE}.Contrastive",
        "init_args": {
            "base": {"class_path": f"{MODULE}.L1", "init_args": {"l1_coef": 0.2, "init_decoder_norm": 0.1}},
            "supcon_weight": 0.4,
            "separation_weight": 0.6,
            "temperature": 0.7,
            "ambiguous_as_benign": False,
        },
    }


def _settings(arch: SAEArchitecture) -> dict[str, Any]:
    """Attributes by hand (not through ``config()``), nested architectures as (type, settings)."""
    return {
        k: (type(v), _settings(v)) if isinstance(v, SAEArchitecture) else v for k, v in vars(arch).items()
    }


ROUND_TRIPS = {
    "topk": TopK(k=4, aux_k=8, aux_coef=0.25, dead_after_steps=7),
    "l1": L1(l1_coef=0.2, init_decoder_norm=0.3),
    "contrastive_topk": Contrastive(
        TopK(k=5, aux_k=0),
        supcon_weight=0.4,
        separation_weight=0.6,
        temperature=0.7,
        ambiguous_as_benign=False,
    ),
    "contrastive_l1": Contrastive(L1(l1_coef=0.9), supcon_weight=0.0),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip_rebuilds_the_same_class_and_settings(name: str) -> None:
    arch = ROUND_TRIPS[name]
    rebuilt = architecture_from_config(arch.config())
    assert type(rebuilt) is type(arch)
    assert _settings(rebuilt) == _settings(arch)
    assert rebuilt == arch and rebuilt.config() == arch.config()
    if isinstance(arch, Contrastive):
        assert isinstance(rebuilt, Contrastive)
        assert type(rebuilt.base) is type(arch.base)  # an architecture again, not the nested dict


def test_yaml_forms_short_class_path_and_missing_init_args_mean_defaults() -> None:
    assert _settings(architecture_from_config({"class_path": "TopK"})) == _settings(TopK())
    assert _settings(architecture_from_config({"class_path": "L1", "init_args": None})) == _settings(L1())
    assert _settings(architecture_from_config({"class_path": "sae_refusal.sae.L1", "init_args": {}})) == {
        "l1_coef": 0.5,
        "init_decoder_norm": 0.1,
    }
    assert _settings(TopK()) == {
        "k": 32,
        "aux_k": 256,
        "aux_coef": 1.0 / 32.0,
        "dead_after_steps": 1000,
        "encoder_dtype": "float32",
    }
    defaults = Contrastive(L1())
    assert (defaults.supcon_weight, defaults.separation_weight, defaults.temperature) == (0.1, 0.0, 0.1)
    assert defaults.ambiguous_as_benign is True
    partial = architecture_from_config({"class_path": "sae_refusal.sae.TopK", "init_args": {"k": 3}})
    assert _settings(partial) == {
        "k": 3,
        "aux_k": 256,
        "aux_coef": 1.0 / 32.0,
        "dead_after_steps": 1000,
        "encoder_dtype": "float32",
    }
    nested = architecture_from_config(
        {"class_path": "Contrastive", "init_args": {"base": {"class_path": "TopK"}, "temperature": 0.2}}
    )
    assert _settings(nested) == _settings(Contrastive(TopK(), temperature=0.2))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"class_path": "sae_refusal.sae.TopQ"},
            r"^model\.architecture: unknown class_path 'sae_refusal\.sae\.TopQ'",
        ),
        (
            {"class_path": "no_such_module.TopK"},
            r"^model\.architecture: unknown class_path 'no_such_module\.TopK'",
        ),
        (
            {"class_path": "Contrastive", "init_args": {"base": {"class_path": "Nope"}}},
            r"^model\.architecture\.base: unknown class_path 'Nope'",
        ),
        (
            {"class_path": "sae_refusal.sae.SAEModule"},
            r"^model\.architecture: 'sae_refusal\.sae\.SAEModule' is not",
        ),
        (
            {"class_path": f"{MODULE}.importlib"},
            r"^model\.architecture: '.*importlib' is not an SAE architecture",
        ),
        ({"init_args": {"k": 4}}, r"^model\.architecture: expected \{'class_path'"),
        (["TopK"], r"^model\.architecture: expected"),
    ],
    ids=[
        "unknown_class",
        "unknown_module",
        "nested_key",
        "not_an_architecture",
        "not_a_class",
        "no_class_path",
        "not_a_dict",
    ],
)
def test_bad_class_path_errors_name_the_key(config: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        architecture_from_config(config)


def test_errors_name_the_given_key() -> None:
    with pytest.raises(ValueError, match=r"^hparams\.arch: unknown class_path"):
        architecture_from_config({"class_path": "TopQ"}, key="hparams.arch")


class _WithOptions(L1):
    """An architecture with a plain-dict setting and a private attribute (left out of the config)."""

    def __init__(
        self, options: dict[str, Any] | None = None, l1_coef: float = 0.5, init_decoder_norm: float = 0.1
    ):
        super().__init__(l1_coef=l1_coef, init_decoder_norm=init_decoder_norm)
        self.options = options
        self._built = 0


def test_plain_dict_settings_stay_dicts_and_private_attributes_stay_out() -> None:
    arch = _WithOptions(options={"mode": "fast", "nested": {"k": 1}}, l1_coef=0.3)
    config = arch.config()
    assert config == {
        "class_path": f"{__name__}._WithOptions",
        "init_args": {
            "l1_coef": 0.3,
            "init_decoder_norm": 0.1,
            "options": {"mode": "fast", "nested": {"k": 1}},
        },
    }
    assert "_built" not in arch.describe()
    rebuilt = architecture_from_config(config)
    assert isinstance(rebuilt, _WithOptions) and rebuilt.options == {"mode": "fast", "nested": {"k": 1}}
    assert rebuilt.l1_coef == 0.3


class _LooksLikeTopK(TopK):
    """Another class whose config is TopK's: still not equal to a TopK."""

    def config(self) -> dict[str, Any]:
        return TopK(**self.init_args()).config()


def test_equality_needs_the_same_type_and_the_same_settings() -> None:
    assert TopK(k=4) == TopK(k=4)
    assert TopK(k=4) != TopK(k=5)
    assert L1() != TopK()
    assert _LooksLikeTopK(k=4).config() == TopK(k=4).config()
    assert _LooksLikeTopK(k=4) != TopK(k=4) and TopK(k=4) != _LooksLikeTopK(k=4)
    duck = SimpleNamespace(config=lambda: TopK(k=4).config())
    assert TopK(k=4) != duck and TopK(k=4) != TopK(k=4).config()
    assert Contrastive(TopK(k=4)) == Contrastive(TopK(k=4))
    assert Contrastive(TopK(k=4)) != Contrastive(TopK(k=5))
    assert Contrastive(TopK(k=4)) != Contrastive(L1())
    with pytest.raises(TypeError):  # mutable settings: not hashable
        hash(TopK())


def test_describe_names_the_class_and_the_nested_base() -> None:
    assert TopK(k=2).describe() == {
        "class": "TopK",
        "k": 2,
        "aux_k": 256,
        "aux_coef": 1.0 / 32.0,
        "dead_after_steps": 1000,
        "encoder_dtype": "float32",
    }
    described = Contrastive(L1(l1_coef=0.3)).describe()
    assert described["class"] == "Contrastive"
    assert described["base"] == {"class": "L1", "l1_coef": 0.3, "init_decoder_norm": 0.1}
