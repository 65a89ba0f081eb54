"""CAA and SAS vectors against hand computation, and the steering-vector artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_refusal.errors import ArtifactError
from sae_refusal.features import SteeringVectors, caa_vectors, sas_vectors
from sae_refusal.features.vectors import class_means, require_nonzero
from sae_refusal.sae import TopKSAE


def test_caa_is_category_mean_minus_benign_mean_and_ignores_ambiguous() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 5, generator=gen)
    y = torch.tensor([0] * 10 + [1] * 8 + [2] * 7 + [-1] * 5)
    vectors, counts = caa_vectors(X, y, n_classes=4)
    assert vectors.shape == (3, 5) and counts.tolist() == [10, 8, 7, 0]
    torch.testing.assert_close(vectors[0], X[10:18].mean(0) - X[:10].mean(0))
    torch.testing.assert_close(vectors[1], X[18:25].mean(0) - X[:10].mean(0))
    assert torch.count_nonzero(vectors[2]) == 0  # category 3 has no rows: a zero vector, count 0


def test_sas_threshold_shared_removal_and_top_k() -> None:
    # features: 0 benign-only, 1 shared, 2 category-1-only strong, 3 category-1-only weak, 4 below tau
    Z = torch.tensor(
        [
            [2.0, 1.0, 0.0, 0.0, 0.05],
            [2.0, 1.0, 0.0, 0.0, 0.05],
            [0.0, 1.5, 3.0, 0.5, 0.05],
            [0.0, 1.5, 3.0, 0.5, 0.05],
        ]
    )
    y = torch.tensor([0, 0, 1, 1])
    sas = sas_vectors(Z, y, n_classes=2, tau=0.1)
    assert sas.vectors_CF[0].tolist() == [-2.0, 0.0, 3.0, 0.5, 0.0]
    assert sas.shared_CF[0].tolist() == [False, True, False, False, False]
    kept = sas_vectors(Z, y, n_classes=2, tau=0.1, remove_shared=False)
    assert kept.vectors_CF[0, 1].item() == pytest.approx(0.5)  # the shared feature's difference stays
    top = sas_vectors(Z, y, n_classes=2, tau=0.1, top_k=2)
    assert top.features(1) == [0, 2]  # the two largest |v_z|
    with pytest.raises(ValueError, match="tau"):
        sas_vectors(Z, y, 2, tau=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sas_vectors(Z, y, 2, top_k=0)


def test_sas_tau_is_inclusive() -> None:
    # tau 0.5; means: feature 0 exactly 0.5 in category 1 (kept), 0.25 in benign (dropped); feature 1
    # exactly 0.5 in benign only (kept as -0.5); feature 2 just below tau everywhere (dropped)
    Z = torch.tensor(
        [
            [0.0, 0.25, 0.4375, 0.0],
            [0.5, 0.75, 0.4375, 0.0],
            [0.25, 0.0, 0.4375, 0.0],
            [0.75, 0.0, 0.4375, 0.0],
        ]
    )
    y = torch.tensor([0, 0, 1, 1])
    sas = sas_vectors(Z, y, n_classes=2, tau=0.5)
    assert sas.active_KF.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert sas.vectors_CF[0].tolist() == [0.5, -0.5, 0.0, 0.0]


def test_sas_feature_above_tau_in_one_class_only() -> None:
    # classes: benign, category 1, category 2; tau 0.5 (means below are hand-computed from the rows)
    #   feature 0: 0.5 (= tau) in category 1 only, 0.25 in category 2 -> kept for 1, dropped for 2
    #   feature 1: 1.0 in benign and 0.5 in category 1 -> shared with 1 (removed there); category 2 has
    #              0.0 -> not shared, its vector keeps -1.0 (benign-only there)
    #   feature 2: 2.0 in category 2 only -> kept for 2, 0 for 1
    Z = torch.tensor(
        [
            [0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.25, 0.25, 0.0],
            [0.75, 0.75, 0.0],
            [0.5, 0.0, 2.0],
            [0.0, 0.0, 2.0],
        ]
    )
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    sas = sas_vectors(Z, y, n_classes=3, tau=0.5)
    assert sas.vectors_CF.tolist() == [[0.5, 0.0, 0.0], [0.0, -1.0, 2.0]]
    assert sas.shared_CF.tolist() == [[False, True, False], [False, False, False]]
    assert sas.features(1) == [0] and sas.features(2) == [1, 2]
    kept = sas_vectors(Z, y, n_classes=3, tau=0.5, remove_shared=False)
    assert kept.vectors_CF.tolist() == [[0.5, -0.5, 0.0], [0.0, -1.0, 2.0]]
    # tau 0 keeps every feature that fires, but a feature that never fires in a set is not active there
    # (else every feature would be "shared" and every vector empty)
    zero = sas_vectors(Z, y, n_classes=3, tau=0.0)
    assert zero.vectors_CF.tolist() == [[0.5, 0.0, 0.0], [0.25, -1.0, 2.0]]


def test_input_errors_name_the_problem() -> None:
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="benign"):
        caa_vectors(X, torch.tensor([1, 1, 2, 2]), 3)
    with pytest.raises(ValueError, match="out of range"):
        class_means(X, torch.tensor([0, 1, 5, 2]), 3)
    with pytest.raises(ValueError, match="one entry per row"):
        class_means(X, torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="2-D"):
        class_means(torch.randn(4), torch.tensor([0, 1, 1, 0]), 3)


def test_artifact_round_trip_and_nothing_written_on_bad_metadata(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    sae = TopKSAE(6, 12, k=3, generator=gen)
    sae.set_input_scale(2.0)
    sas_CF = torch.zeros(2, 12)
    sas_CF[0, 3], sas_CF[1, 5] = 1.5, -0.5
    decoded = sae.decode_direction(sas_CF)
    torch.testing.assert_close(decoded[0], 1.5 * sae.W_dec_FD[3].detach() / 2.0)
    vec = SteeringVectors(
        class_names=["benign", "a", "b"],
        caa_CD=torch.randn(2, 6, generator=gen),
        sas_CF=sas_CF,
        sas_decoded_CD=decoded.detach(),
        metadata={"layer": 3, "tau": 0.0},
    )
    folder = vec.save(tmp_path / "vec")
    loaded = SteeringVectors.load(folder)
    assert loaded.class_names == vec.class_names and loaded.metadata == {"layer": 3, "tau": 0.0}
    torch.testing.assert_close(loaded.vector("b", "sas"), sas_CF[1])
    torch.testing.assert_close(loaded.vector(1, "caa"), vec.caa_CD[0])
    assert json.loads((folder / "vectors.json").read_text())["tensors"] == [
        "caa_CD",
        "sas_CF",
        "sas_decoded_CD",
    ]
    with pytest.raises(ValueError, match="not one of"):
        loaded.vector("benign")
    bad = SteeringVectors(class_names=["benign", "a", "b"], caa_CD=vec.caa_CD, metadata={"x": object()})
    with pytest.raises(TypeError):
        bad.save(tmp_path / "vec")  # the existing artifact is kept, no temp folder left behind
    torch.testing.assert_close(SteeringVectors.load(folder).caa_CD, vec.caa_CD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec"]
    with pytest.raises(ValueError, match="one row per category"):
        SteeringVectors(class_names=["benign", "a"], caa_CD=torch.zeros(2, 6))
    with pytest.raises(FileNotFoundError, match=r"vectors\.json"):
        SteeringVectors.load(tmp_path)
    caa_only = SteeringVectors(class_names=["benign", "a", "b"], caa_CD=vec.caa_CD)
    with pytest.raises(ValueError, match="no 'sas'"):
        SteeringVectors.load(caa_only.save(tmp_path / "caa")).vector("a", "sas")


def test_class_means_by_hand_one_row_classes_and_empty_ones() -> None:
    # class 0: two rows, class 1: one row, class 2: none, class 3: one row; -1 rows are ignored
    X = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, -1.0], [7.0, 8.0], [100.0, 100.0]])
    y = torch.tensor([0, 0, 1, 3, -1])
    means, counts = class_means(X, y, n_classes=4)
    assert counts.tolist() == [2, 1, 0, 1]
    assert means.dtype == torch.float32
    assert means.tolist() == [[2.0, 4.0], [5.0, -1.0], [0.0, 0.0], [7.0, 8.0]]  # a one-row class: that row
    vectors, _ = caa_vectors(X, y, n_classes=4)
    assert vectors.tolist() == [[3.0, -5.0], [0.0, 0.0], [5.0, 4.0]]  # row c - 1 = category c


def test_absent_category_gets_a_zero_vector_in_both_spaces() -> None:
    # benign fires features 0 and 1, category 1 fires feature 2, category 2 has no rows, category 3 fires 1
    Z = torch.tensor(
        [
            [1.0, 2.0, 0.0],
            [1.0, 2.0, 0.0],
            [0.0, 0.0, 4.0],
            [0.0, 3.0, 0.0],
        ]
    )
    y = torch.tensor([0, 0, 1, 3])
    sas = sas_vectors(Z, y, n_classes=4, tau=0.5)
    # without its count check, category 2 would get -benign = [-1, -2, 0]
    assert sas.vectors_CF.tolist() == [[-1.0, -2.0, 4.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]
    assert sas.features(1) == [0, 1, 2] and sas.features(2) == [] and sas.features(3) == [0]
    caa, counts = caa_vectors(Z, y, n_classes=4)
    assert counts.tolist() == [2, 1, 0, 1]
    assert caa[1].tolist() == [0.0, 0.0, 0.0]
    assert caa[0].tolist() == [-1.0, -2.0, 4.0] and caa[2].tolist() == [-1.0, 1.0, 0.0]


def test_sas_result_holds_every_intermediate() -> None:
    Z = torch.tensor(
        [
            [2.0, 1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 2.0, 3.0, 0.0],
            [0.0, 0.0, 0.0, 0.25],
        ]
    )
    y = torch.tensor([0, 0, 1, 2])
    sas = sas_vectors(Z, y, n_classes=3, tau=0.5, top_k=2)
    assert sas.means_KF.tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.25]]
    assert sas.active_KF.tolist() == [
        [True, True, False, False],
        [False, True, True, False],
        [False, False, False, False],  # 0.25 is below tau
    ]
    assert sas.shared_CF.tolist() == [[False, True, False, False], [False, False, False, False]]
    assert sas.counts_K.tolist() == [2, 1, 1]
    assert sas.tau == 0.5 and isinstance(sas.tau, float) and sas.top_k == 2
    # category 1: benign-only feature 0 (-1), shared feature 1 removed, own feature 2 (+3)
    # category 2: nothing active of its own; benign features 0 and 1 stay as -1 each (top 2 of 4)
    assert sas.vectors_CF.tolist() == [[-1.0, 0.0, 3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]
    assert sas.features(1) == [0, 2] and sas.features(2) == [0, 1]
    assert sas_vectors(Z, y, n_classes=3).top_k is None
    assert type(sas_vectors(Z, y, n_classes=3, tau=1).tau) is float  # as documented, whatever was passed


def test_artifact_round_trip_keeps_every_field(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    vec = SteeringVectors(
        class_names=["benign", "a", "b", "c"],
        caa_CD=torch.randn(3, 5, generator=gen),
        sas_CF=torch.randn(3, 9, generator=gen),
        sas_decoded_CD=torch.randn(3, 5, generator=gen),
        metadata={"layer": 4, "model": "tiny", "top_k": None, "sizes": [3, 1, 2, 2]},
    )
    loaded = SteeringVectors.load(vec.save(tmp_path / "vec"))
    assert loaded.class_names == ["benign", "a", "b", "c"] and loaded.metadata == vec.metadata
    for name in ("caa_CD", "sas_CF", "sas_decoded_CD"):
        original, back = getattr(vec, name), getattr(loaded, name)
        assert back is not None and back.dtype == torch.float32, name
        assert torch.equal(back, original), name
    for code, name in enumerate(["a", "b", "c"], start=1):
        for space, tensor in (("caa", vec.caa_CD), ("sas", vec.sas_CF), ("sas_decoded", vec.sas_decoded_CD)):
            assert tensor is not None
            assert torch.equal(loaded.vector(name, space), tensor[code - 1]), (name, space)
            assert torch.equal(loaded.vector(code, space), tensor[code - 1]), (code, space)
    with pytest.raises(ValueError, match="not one of"):
        loaded.vector(4)
    with pytest.raises(ValueError, match="not one of"):
        loaded.vector(0)
    with pytest.raises(ValueError, match="no 'residual'"):
        loaded.vector("a", "residual")
    caa_only = SteeringVectors.load(SteeringVectors(["benign", "a"], vec.caa_CD[:1]).save(tmp_path / "caa"))
    assert caa_only.sas_CF is None and caa_only.sas_decoded_CD is None and caa_only.metadata == {}
    assert torch.equal(caa_only.caa_CD, vec.caa_CD[:1])
    with pytest.raises(ValueError, match="no 'sas_decoded'"):
        caa_only.vector("a", "sas_decoded")


def test_artifact_checks_every_tensor_has_one_row_per_category() -> None:
    good = torch.zeros(2, 4)
    for name in ("caa_CD", "sas_CF", "sas_decoded_CD"):
        kwargs = {"caa_CD": good, name: torch.zeros(3, 4)}
        with pytest.raises(ValueError, match=rf"{name} must have one row per category \(2\)"):
            SteeringVectors(class_names=["benign", "a", "b"], **kwargs)
        with pytest.raises(ValueError, match=name):
            SteeringVectors(class_names=["benign", "a", "b"], **{"caa_CD": good, name: torch.zeros(2)})


def test_non_finite_vectors_are_refused_on_save_and_load(tmp_path: Path) -> None:
    """An SAE with NaN weights gave NaN vectors; they must not be written, nor read if written elsewhere."""
    caa_CD = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    sas_CF = torch.zeros(2, 12)
    sas_CF[1, 4] = float("nan")
    with pytest.raises(ArtifactError, match=r"vec/vectors\.safetensors: tensor 'sas_CF' holds inf/nan"):
        SteeringVectors(["benign", "a", "b"], caa_CD, sas_CF=sas_CF).save(tmp_path / "vec")
    assert not list(tmp_path.iterdir())
    folder = SteeringVectors(["benign", "a", "b"], caa_CD).save(tmp_path / "vec")
    save_file({"caa_CD": caa_CD.clone().fill_(float("inf"))}, str(folder / "vectors.safetensors"))
    with pytest.raises(ArtifactError, match=r"vec/vectors\.safetensors: tensor 'caa_CD' holds inf/nan"):
        SteeringVectors.load(folder)
    (folder / "vectors.json").write_text("{garbled")
    with pytest.raises(ArtifactError, match=r"vec/vectors\.json: not valid JSON"):
        SteeringVectors.load(folder)


def test_recorded_provenance_and_all_zero_vectors(tmp_path: Path) -> None:
    caa_CD = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    fingerprint = {"model": "m", "weights_hash": "h", "adapter": "a"}
    vec = SteeringVectors(
        ["benign", "a", "b"], caa_CD, metadata={"layer": 3, "model": "m", "model_fingerprint": fingerprint}
    )
    recorded = SteeringVectors.load(vec.save(tmp_path / "v")).recorded()
    assert recorded == {"layer": 3, "model": "m", "model_fingerprint": fingerprint, "d_model": 6}
    require_nonzero(caa_CD[0], "v", "--allow")
    with pytest.raises(ArtifactError, match=r"^v is all zeros .* or set --allow to run it anyway$"):
        require_nonzero(torch.zeros(6), "v", "--allow")
