"""Linear maps between residual spaces (fit, score, save/load) and the exactly-widened tiny models that give
them a ground truth: a wider model whose residual is a known linear image of a small model's."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from sae_refusal.llm.extraction import last_token_residuals, position_ids_from_mask
from sae_refusal.llm.tokenize import pad_left
from sae_refusal.testing.tiny import TINY_ARCHITECTURES, build_tiny_model, widen_model
from sae_refusal.transfer import linear_map
from sae_refusal.transfer.linear_map import (
    MAP_FILE,
    META_FILE,
    LinearMap,
    fit_linear_map,
    map_fit_quality,
)


def _affine_data(
    n: int = 200, d: int = 12, e: int = 20, noise: float = 1e-3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Off-centre rows ``X`` (a fit that skips centring is wrong), ``Y = X @ W + b + noise``, ``W``, ``b``."""
    g = torch.Generator().manual_seed(seed)
    X_ND = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d) + 3.0
    W_DE = torch.randn(d, e, generator=g)
    b_E = torch.randn(e, generator=g)
    Y_NE = X_ND @ W_DE + b_E + noise * torch.randn(n, e, generator=g)
    return X_ND, Y_NE, W_DE, b_E


# ------------------------------------------------------------------------------------------------ fitting
def test_fit_recovers_known_affine_map() -> None:
    X_ND, Y_NE, W_DE, b_E = _affine_data()
    fitted = fit_linear_map(X_ND, Y_NE, metadata={"layer": 3, "n_rows": -1})
    assert (fitted.d_in, fitted.d_out) == (12, 20)
    assert fitted.W_DE.dtype == fitted.b_E.dtype == torch.float32
    torch.testing.assert_close(fitted.W_DE, W_DE, atol=2e-3, rtol=0)
    torch.testing.assert_close(fitted.b_E, b_E, atol=2e-2, rtol=0)
    quality = map_fit_quality(fitted, X_ND, Y_NE)
    assert quality["r2"] > 0.999999 and quality["mean_cosine"] > 0.999999 and quality["n"] == 200
    assert math.isclose(quality["r2"], 1 - quality["fvu"])
    # the fit's own facts win over the caller's metadata, which is otherwise kept
    assert fitted.metadata["layer"] == 3 and fitted.metadata["n_rows"] == 200
    assert fitted.metadata["ridge"] == 1e-6 and fitted.metadata["center"] is True
    assert math.isclose(fitted.metadata["train_fvu"], quality["fvu"], rel_tol=1e-9)


def test_fit_without_centring_is_linear() -> None:
    X_ND, _, W_DE, _ = _affine_data(noise=0.0)
    fitted = fit_linear_map(X_ND, X_ND @ W_DE, center=False, ridge=0.0)
    assert torch.equal(fitted.b_E, torch.zeros(20))
    torch.testing.assert_close(fitted.W_DE, W_DE, atol=1e-4, rtol=0)


def test_fit_without_centring_is_least_squares_through_the_origin() -> None:
    X_ND, Y_NE, _, _ = _affine_data()  # off-centre rows and an offset: centring would change W
    fitted = fit_linear_map(X_ND, Y_NE, center=False, ridge=0.0)
    expected = torch.linalg.lstsq(X_ND.double(), Y_NE.double()).solution.float()
    torch.testing.assert_close(fitted.W_DE, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(fitted.b_E, torch.zeros(20))


def test_the_fit_accumulates_over_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large fits run in row chunks: sums, Gram and cross products add up over all of them."""
    X_ND, Y_NE, _, _ = _affine_data(n=50, noise=0.1)
    whole = fit_linear_map(X_ND, Y_NE)
    monkeypatch.setattr(linear_map, "_CHUNK_ROWS", 7)  # 8 chunks, the last one short
    chunked = fit_linear_map(X_ND, Y_NE)
    torch.testing.assert_close(chunked.W_DE, whole.W_DE, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.b_E, whole.b_E, atol=1e-5, rtol=1e-5)
    assert chunked.metadata["train_fvu"] == pytest.approx(whole.metadata["train_fvu"], rel=1e-6)


def test_the_means_are_accumulated_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 residual rows far from the origin (an offset of 1e7), summed one row-chunk at a time: a float32
    # running sum (spacing 256 near 2.6e9) moves the intercept by ~5 (measured 3.9-5.9); float64 keeps it to
    # the output's own float32 rounding (spacing 1 near 1e7; measured <= 0.13)
    monkeypatch.setattr(linear_map, "_CHUNK_ROWS", 1)
    g = torch.Generator().manual_seed(2)
    X_ND = torch.randn(256, 3, generator=g)
    Y_NE = X_ND @ torch.randn(3, 2, generator=g) + 1e7 + torch.randn(256, 2, generator=g)
    fitted = fit_linear_map(X_ND, Y_NE, ridge=0.0)
    with_intercept = torch.cat([X_ND.double(), torch.ones(256, 1, dtype=torch.float64)], dim=1)
    reference = torch.linalg.lstsq(with_intercept, Y_NE.double()).solution
    torch.testing.assert_close(fitted.b_E.double(), reference[-1], atol=1.0, rtol=0)


def test_the_smallest_fits_work() -> None:
    g = torch.Generator().manual_seed(4)
    two = fit_linear_map(torch.randn(2, 3, generator=g), torch.randn(2, 2, generator=g), ridge=1e-3)
    assert torch.isfinite(two.W_DE).all()  # two rows are enough with a ridge
    x_N1 = torch.randn(20, 1, generator=g)
    one_column = fit_linear_map(x_N1, 3.0 * x_N1 + 1.0, ridge=0.0)
    torch.testing.assert_close(one_column.W_DE, torch.tensor([[3.0]]))
    torch.testing.assert_close(one_column.b_E, torch.tensor([1.0]))


def test_relative_ridge_is_scale_free() -> None:
    X_ND, Y_NE, _, _ = _affine_data(noise=0.5)
    ridge = 0.05
    small = fit_linear_map(X_ND, Y_NE, ridge=ridge)
    big = fit_linear_map(1000.0 * X_ND, Y_NE, ridge=ridge)
    torch.testing.assert_close(big(1000.0 * X_ND), small(X_ND), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(1000.0 * big.W_DE, small.W_DE, atol=1e-4, rtol=1e-5)
    plain = fit_linear_map(X_ND, Y_NE, ridge=0.0)  # the ridge does something: this is not a vacuous test
    assert (plain(X_ND) - small(X_ND)).abs().max() > 1e-2


def test_call_and_direction() -> None:
    g = torch.Generator().manual_seed(1)
    m = LinearMap(W_DE=torch.randn(6, 4, generator=g), b_E=torch.randn(4, generator=g))
    x_BTD = torch.randn(2, 3, 6, generator=g)
    torch.testing.assert_close(m(x_BTD), x_BTD @ m.W_DE + m.b_E)
    assert m(x_BTD.bfloat16()).dtype == torch.bfloat16
    v_D = torch.randn(6, generator=g)
    torch.testing.assert_close(m.direction(v_D), v_D @ m.W_DE)  # no bias: a difference of two points
    torch.testing.assert_close(m.direction(v_D), m(v_D) - m(torch.zeros(6)))
    with pytest.raises(ValueError, match=r"^x_ND must end in the map's input width 6, got shape \(3, 5\)$"):
        m(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"^v_KD must end in the map's input width 6, got shape \(5,\)$"):
        m.direction(torch.zeros(5))
    with pytest.raises(ValueError, match="b_E"):
        LinearMap(W_DE=torch.zeros(6, 4), b_E=torch.zeros(5))
    with pytest.raises(ValueError, match=r"^W_DE must be 2-D \(d_in, d_out\), got shape \(6,\)$"):
        LinearMap(W_DE=torch.zeros(6), b_E=torch.zeros(4))
    assert m.direction(v_D.double()).dtype == torch.float64  # directions keep their dtype
    double = LinearMap(W_DE=m.W_DE.double(), b_E=m.b_E.double())  # stored as float32, both tensors
    assert double.W_DE.dtype == double.b_E.dtype == torch.float32
    torch.testing.assert_close(double(x_BTD), m(x_BTD))


def test_fit_quality_of_a_perfect_and_a_useless_map() -> None:
    X_ND, Y_NE, W_DE, b_E = _affine_data(noise=0.0)
    perfect = map_fit_quality(LinearMap(W_DE, b_E), X_ND, Y_NE)
    assert perfect["fvu"] < 1e-10 and perfect["mean_cosine"] > 1 - 1e-10
    mean_only = map_fit_quality(LinearMap(torch.zeros(12, 20), Y_NE.mean(0)), X_ND, Y_NE)
    assert math.isclose(mean_only["fvu"], 1.0, rel_tol=1e-6) and abs(mean_only["r2"]) < 1e-6
    with pytest.raises(ValueError, match="Y_NE"):
        map_fit_quality(LinearMap(W_DE, b_E), X_ND, Y_NE[:, :5])


def _bad(name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    X_ND, Y_NE = torch.randn(30, 4), torch.randn(30, 3)
    if name == "rows":
        return X_ND, Y_NE[:29], 1e-6
    if name == "one_row":
        return X_ND[:1], Y_NE[:1], 1e-6
    if name == "x_1d":
        return X_ND[:, 0], Y_NE, 1e-6
    if name == "y_3d":
        return X_ND, Y_NE[None], 1e-6
    if name == "x_nan":
        X_ND[3, 1] = math.nan
        return X_ND, Y_NE, 1e-6
    if name == "y_inf":
        Y_NE[7, 2] = math.inf
        return X_ND, Y_NE, 1e-6
    if name == "ridge_negative":
        return X_ND, Y_NE, -1e-3
    if name == "ridge_nan":
        return X_ND, Y_NE, math.nan
    if name == "underdetermined":
        return torch.randn(4, 4), torch.randn(4, 3), 0.0
    if name == "rank_deficient":
        X_ND[:, 2] = 5.0  # a constant column carries no information once centred
        return X_ND, Y_NE, 0.0
    if name == "constant":
        return torch.ones(30, 4), Y_NE, 1e-6
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("case", "argument"),
    [
        ("rows", "Y_NE"),
        ("one_row", "X_ND"),
        ("x_1d", "X_ND"),
        ("y_3d", "Y_NE"),
        ("x_nan", "X_ND"),
        ("y_inf", "Y_NE"),
        ("ridge_negative", "ridge"),
        ("ridge_nan", "ridge"),
        ("underdetermined", "ridge"),
        ("rank_deficient", "ridge"),
        ("constant", "X_ND"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(case: str, argument: str) -> None:
    X_ND, Y_NE, ridge = _bad(case)
    with pytest.raises(ValueError, match=argument):
        fit_linear_map(X_ND, Y_NE, ridge=ridge)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "message"),
    [
        ("ones", "y", {}, r"^X_ND has no variance \(all rows equal\)$"),
        ("zeros", "y", {"center": False}, r"^X_ND has no variance \(all rows equal, or all zero\)$"),
        ("x", "y", {"ridge": True}, r"^ridge must be a finite number >= 0, got True"),
        ("x", "y", {"ridge": "1e-6"}, r"^ridge must be a finite number >= 0, got '1e-6'"),
        ("constant_column", "y", {"ridge": 0.0}, r"^X_ND is rank-deficient .*; set ridge > 0"),
        ("no_columns", "y", {}, r"^X_ND has zero columns$"),
        ("x", "no_columns", {}, r"^Y_NE has zero columns$"),
        ("bool", "y", {}, r"^X_ND must hold real numbers, got dtype torch.bool$"),
        ("complex", "y", {}, r"^X_ND must hold real numbers, got dtype torch.complex64$"),
        ("x", "bool", {}, r"^Y_NE must hold real numbers, got dtype torch.bool$"),
        ("x", "short", {}, r"^Y_NE has 29 rows but X_ND has 30: the rows must be paired$"),
        ("nan", "y", {}, r"^X_ND contains NaN or inf values$"),
        ("x", "nan", {}, r"^Y_NE contains NaN or inf values$"),
    ],
)
def test_bad_inputs_name_the_tensor_and_the_reason(x: str, y: str, kwargs: dict, message: str) -> None:
    g = torch.Generator().manual_seed(0)
    X_ND, Y_NE = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)
    constant_column = X_ND.clone()
    constant_column[:, 3] = 5.0  # zero once centred: an exactly zero pivot
    xs = {
        "x": X_ND,
        "ones": torch.ones(30, 4),
        "zeros": torch.zeros(30, 4),
        "constant_column": constant_column,
        "no_columns": torch.zeros(30, 0),
        "bool": X_ND > 0,
        "complex": X_ND.to(torch.complex64),
        "nan": torch.where(X_ND > 2.0, math.nan, X_ND),
    }
    ys = {"y": Y_NE, "no_columns": torch.zeros(30, 0), "bool": Y_NE > 0, "short": Y_NE[:29]}
    ys["nan"] = torch.cat([Y_NE[:-1], torch.full((1, 3), math.inf)])
    with pytest.raises(ValueError, match=message):
        fit_linear_map(xs[x], ys[y], **kwargs)


def test_a_gram_matrix_singular_despite_the_ridge_says_raise_the_ridge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # with a ridge the system is positive definite in exact arithmetic; rounding can still break Cholesky
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a: (a, torch.tensor(1)))
    X_ND, Y_NE, _, _ = _affine_data()
    with pytest.raises(
        ValueError, match=r"^X_ND's Gram matrix is numerically singular even with ridge=0.01; raise"
    ):
        fit_linear_map(X_ND, Y_NE, ridge=0.01)
    with pytest.raises(ValueError, match=r"^X_ND is rank-deficient"):
        fit_linear_map(X_ND, Y_NE, ridge=0.0)


def test_underdetermined_fit_works_with_a_ridge() -> None:
    X_ND, Y_NE, _, _ = _affine_data(n=8)
    with pytest.raises(ValueError, match="underdetermined"):
        fit_linear_map(X_ND, Y_NE, ridge=0.0)
    square = (
        r"^X_ND has 12 rows for 12 columns: the fit is underdetermined; set ridge > 0 \(e\.g\. 1e-6\) or "
        r"give more rows$"
    )
    with pytest.raises(ValueError, match=square):  # as many rows as columns is too few too
        fit_linear_map(*_affine_data(n=12)[:2], ridge=0.0)
    fitted = fit_linear_map(X_ND, Y_NE, ridge=1e-6)
    assert torch.isfinite(fitted.W_DE).all() and map_fit_quality(fitted, X_ND, Y_NE)["r2"] > 0.999


# ------------------------------------------------------------------------------------------------ artifact
def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    X_ND, Y_NE, _, _ = _affine_data()
    fitted = fit_linear_map(X_ND, Y_NE, metadata={"models": {"a": "tiny", "b": "wide"}, "layer": 2})
    folder = fitted.save(tmp_path / "maps" / "a_to_b")
    assert sorted(p.name for p in folder.iterdir()) == [META_FILE, MAP_FILE]
    assert [p.name for p in folder.parent.iterdir()] == ["a_to_b"]  # no temporary left behind
    loaded = LinearMap.load(folder)
    assert torch.equal(loaded.W_DE, fitted.W_DE) and torch.equal(loaded.b_E, fitted.b_E)
    assert loaded.metadata == fitted.metadata
    record = json.loads((folder / META_FILE).read_text())
    assert (record["d_in"], record["d_out"]) == (12, 20) and record["shapes"]["W_DE"] == [12, 20]
    assert record["format"] == linear_map.FORMAT
    with safe_open(str(folder / MAP_FILE), "pt") as tensors:
        assert tensors.metadata() == {"format": linear_map.FORMAT}


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=META_FILE):
        LinearMap.load(tmp_path)
    folder = LinearMap(torch.randn(3, 2), torch.randn(2)).save(tmp_path / "m")
    record = json.loads((folder / META_FILE).read_text())
    record["d_in"] = 4
    (folder / META_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=META_FILE):
        LinearMap.load(folder)
    (folder / MAP_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MAP_FILE):
        LinearMap.load(folder)
    with pytest.raises(ValueError, match="metadata"):
        LinearMap(torch.randn(3, 2), torch.randn(2), metadata={"bad": object()}).save(tmp_path / "n")
    assert not (tmp_path / "n").exists()
    good = LinearMap(torch.randn(3, 2), torch.randn(2)).save(tmp_path / "g")
    tensor_path = good / MAP_FILE
    for tensors, message in (
        ({"W_DE": torch.zeros(3, 2)}, r" lacks tensor\(s\) \['b_E'\]$"),
        (
            {"W_DE": torch.zeros(3, 2), "b_E": torch.zeros(3)},
            r": inconsistent shapes W_DE \(3, 2\) and b_E \(3,\)$",
        ),
        (
            {"W_DE": torch.zeros(3), "b_E": torch.zeros(3)},
            r": inconsistent shapes W_DE \(3,\) and b_E \(3,\)$",
        ),
    ):
        save_file(tensors, str(tensor_path))
        with pytest.raises(ValueError, match=f"^{re.escape(str(tensor_path))}{message}"):
            LinearMap.load(good)
    tensor_path.write_bytes(b"not safetensors")
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(tensor_path))} is not a readable safetensors file"
    ):
        LinearMap.load(good)


# ------------------------------------------------------------------------------------------------ widen_model
def _tiny(arch: str, num_layers: int = 2) -> PreTrainedModel:
    """A tiny model whose norm weights and biases are random too (at init they are 1 and 0: too kind)."""
    model = build_tiny_model(arch, num_layers=num_layers)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=g))
    return model


def _padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return pad_left(rows, 0)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_widened_model_has_same_logits_and_mapped_residuals(arch: str) -> None:
    small = _tiny(arch)
    d, scale = small.config.hidden_size, 2.5
    wide, W_DE = widen_model(small, d + 16, scale=scale, seed=3)
    assert wide.config.hidden_size == d + 16 and W_DE.shape == (d, d + 16)
    assert torch.equal((W_DE != 0).sum(1), torch.ones(d, dtype=torch.long))  # one new coordinate each ...
    assert torch.equal((W_DE != 0).sum(0).max(), torch.tensor(1))  # ... all distinct
    assert torch.equal(W_DE[W_DE != 0], torch.full((d,), scale))
    ids_BT, mask_BT = _padded_batch(small.config.vocab_size, [9, 5, 2, 7])
    kwargs = dict(
        attention_mask=mask_BT, position_ids=position_ids_from_mask(mask_BT), output_hidden_states=True
    )
    with torch.no_grad():
        out_a, out_b = small(input_ids=ids_BT, **kwargs), wide(input_ids=ids_BT, **kwargs)
    real = mask_BT.bool()
    torch.testing.assert_close(out_b.logits[real], out_a.logits[real], atol=1e-5, rtol=1e-4)
    *residuals, final = range(len(out_a.hidden_states))
    for layer in residuals:  # embeddings and block outputs: scale * h_A @ P
        torch.testing.assert_close(
            out_b.hidden_states[layer][real], out_a.hidden_states[layer][real] @ W_DE, atol=1e-5, rtol=1e-4
        )
    # Hugging Face's last hidden state is after the final norm, which undoes the scale: h_A @ P
    torch.testing.assert_close(
        out_b.hidden_states[final][real],
        out_a.hidden_states[final][real] @ (W_DE / scale),
        atol=1e-5,
        rtol=1e-4,
    )


def test_widen_model_is_seeded_and_checks_its_arguments() -> None:
    small = _tiny("llama", num_layers=1)
    _, W1 = widen_model(small, 40, seed=5)
    _, W2 = widen_model(small, 40, seed=5)
    _, W3 = widen_model(small, 40, seed=6)
    assert torch.equal(W1, W2) and not torch.equal(W1, W3)
    with pytest.raises(ValueError, match="d_new"):
        widen_model(small, 32)
    with pytest.raises(ValueError, match="scale"):
        widen_model(small, 40, scale=0.0)


# ------------------------------------------------------------------------------------------------ end to end
def test_fitted_map_between_models_of_different_widths_recovers_the_known_map() -> None:
    """A (width 32) and B = widen(A) (width 48): the map fitted on their activations is the known one."""
    model_a = build_tiny_model("llama")
    model_b, W_known_DE = widen_model(model_a, model_a.config.hidden_size + 16, scale=2.5)
    layer, vocab = 2, model_a.config.vocab_size
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(2, 14, (300,), generator=g).tolist()
    acts: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for start in range(0, len(lengths), 100):
        ids_BT, mask_BT = _padded_batch(vocab, lengths[start : start + 100], seed=start)
        for key, model in (("a", model_a), ("b", model_b)):
            acts[key].append(last_token_residuals(model, ids_BT, mask_BT, [layer])[layer])
    X_ND, Y_NE = torch.cat(acts["a"]), torch.cat(acts["b"])
    assert X_ND.shape == (300, 32) and Y_NE.shape == (300, 48)

    a_to_b = fit_linear_map(X_ND, Y_NE, metadata={"direction": "A -> B", "layer": layer})
    torch.testing.assert_close(a_to_b.W_DE, W_known_DE, atol=1e-4, rtol=0)
    assert a_to_b.b_E.abs().max() < 1e-5
    assert map_fit_quality(a_to_b, X_ND, Y_NE)["r2"] > 0.999

    # B -> A: B never uses 16 of its coordinates, so only a ridge makes the fit well-posed; it then finds
    # the pseudo-inverse of the known map (zero weight on the unused coordinates).
    with pytest.raises(ValueError, match="ridge"):
        fit_linear_map(Y_NE, X_ND, ridge=0.0)
    b_to_a = fit_linear_map(Y_NE, X_ND)
    torch.testing.assert_close(b_to_a.W_DE, torch.linalg.pinv(W_known_DE), atol=1e-4, rtol=0)
    quality = map_fit_quality(b_to_a, Y_NE, X_ND)
    assert quality["r2"] > 0.999 and quality["mean_cosine"] > 0.999
    torch.testing.assert_close(b_to_a(a_to_b(X_ND)), X_ND, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(12))
def test_a_duplicated_column_without_a_ridge_is_refused_whatever_the_rounding(seed: int) -> None:
    """The Cholesky of a rank-deficient Gram can 'succeed' on a round-off pivot (about half of these seeds
    did): that pivot is singular too, not a fit with an enormous W along the dependent direction."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    X[:, 5] = X[:, 2]
    Y = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rank-deficient .*set ridge > 0"):
        fit_linear_map(X.float(), Y.float(), ridge=0.0)
    fit_linear_map(X.float(), Y.float(), ridge=1e-6)  # the advice works


def test_an_ill_conditioned_but_full_rank_fit_without_a_ridge_still_fits() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(400, 8, generator=gen)
    X[:, 7] = X[:, 3] + 1e-3 * torch.randn(400, generator=gen)  # nearly, not exactly, dependent
    W = torch.randn(8, 2, generator=gen)
    fitted = fit_linear_map(X, X @ W, ridge=0.0)
    assert torch.allclose(fitted(X), X @ W, atol=1e-3)
