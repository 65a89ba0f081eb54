"""The comparison configs of lightning_configs/experiments/sae_compare parse, pass the preflight, and each
architecture overlay picks its architecture at matched k on both layers (issue 26)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sae_refusal.activations.datamodule import ActivationDataModule
from sae_refusal.cli_lightning import SAERefusalCLI
from sae_refusal.config_check import preflight_fit
from sae_refusal.sae import SAEModule

REPO = Path(__file__).resolve().parents[1]
COMPARE = REPO / "lightning_configs" / "experiments" / "sae_compare"
LAYERS = sorted(COMPARE.glob("layer*.yaml"))
ARCHS = sorted(p for p in COMPARE.glob("*.yaml") if p.name != "base.yaml" and p not in LAYERS)
EXPECTED = {
    "topk": "sae_refusal.sae.TopK",
    "batchtopk": "sae_refusal.sae.BatchTopK",
    "matryoshka": "sae_refusal.sae.MatryoshkaBatchTopK",
    "jumprelu": "sae_refusal.sae.JumpReLU",
    "l1": "sae_refusal.sae.L1",
    "contrastive": "sae_refusal.sae.Contrastive",
    "topk_k8": "sae_refusal.sae.TopK",
    "batchtopk_k8": "sae_refusal.sae.BatchTopK",
    "matryoshka_k8": "sae_refusal.sae.MatryoshkaBatchTopK",
}


class _ParseOnlyCLI(SAERefusalCLI):
    def instantiate_classes(self) -> None:
        pass


def _args(layer: Path, arch: Path) -> list[str]:
    return [
        *("--config", str(REPO / "lightning_configs" / "default.yaml")),
        *("--config", str(COMPARE / "base.yaml")),
        *("--config", str(layer)),
        *("--config", str(arch)),
    ]


def _parse(args: list[str]) -> Any:
    return _ParseOnlyCLI(
        SAEModule, ActivationDataModule, subclass_mode_model=True, args=args, run=False
    ).config


def test_the_folder_has_the_architectures_and_two_layers() -> None:
    assert {p.stem for p in ARCHS} == set(EXPECTED)
    assert [p.stem for p in LAYERS] == ["layer12", "layer21"]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda p: p.stem)
def test_each_combination_parses_with_its_architecture_and_layer(layer: Path, arch: Path) -> None:
    args = _args(layer, arch)
    preflight_fit(args)
    cfg = _parse(args)
    architecture = cfg.model.init_args.architecture
    assert architecture.class_path == EXPECTED[arch.stem]
    assert cfg.data.layer == int(layer.stem.removeprefix("layer"))
    assert list(cfg.data.cache.layers) == [12, 21]  # one cache serves both layers
    assert list(cfg.model.init_args.seeds) == [0, 1, 2] and cfg.model.init_args.expansion_factor == 8
    base = architecture.init_args.get("base") or architecture
    if "k" in base.init_args:
        # matched k for the TopK family; the _k8 overlays are the sparser variants
        assert base.init_args.k == (8 if arch.stem.endswith("_k8") else 32)
