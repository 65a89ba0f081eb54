"""sparsify export/import: the folded input scale round-trips, strict reading, and (optionally) the library.

The ``interop`` tests load EleutherAI sparsify's ``SparseCoder`` (skipped with the reason when it is not
importable); its package ``__init__`` imports the trainer (``datasets``), so :func:`_sparse_coder_module`
falls back to loading ``sparsify.sparse_coder`` without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_refusal.errors import ArtifactError
from sae_refusal.sae import ReLUSAE, SparseAutoencoder, TopKSAE
from sae_refusal.sae.batchtopk import BatchTopKSAE, MatryoshkaBatchTopKSAE
from sae_refusal.sae.formats.sparsify import (
    PROVENANCE_FILE,
    SPARSIFY_WEIGHTS,
    is_sparsify_folder,
    load_sparsify,
    read_sparsify_metadata,
    save_sparsify,
)
from sae_refusal.sae.jumprelu import JumpReLUSAE
from sae_refusal.sae.jumprelu_train import TrainableJumpReLUSAE

D, F, K, SCALE = 16, 64, 4, 0.37
SPARSIFY_FIELDS = {
    "activation": "topk",
    "expansion_factor": F // D,
    "normalize_decoder": True,
    "num_latents": F,
    "k": K,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
    "d_in": D,
}


def raw_inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    """Raw-space activations with an offset (so the decoder bias matters) and a scale far from 1."""
    gen = torch.Generator().manual_seed(seed)
    return 2.5 * torch.randn(n, D, generator=gen) + torch.linspace(-1.0, 1.0, D)


@pytest.fixture(scope="module")
def trained_sae() -> TopKSAE:
    """A TopK SAE (d 16, F 64, k 4) after 30 Adam steps with input scale 0.37: every parameter non-trivial."""
    sae = TopKSAE(D, F, K, generator=torch.Generator().manual_seed(0))
    sae.set_input_scale(SCALE)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x_BD = raw_inputs(256, seed=0)
    for _ in range(30):
        loss = sae(x_BD).loss
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
    sae.eval()
    assert sae.b_enc_F.abs().max() > 1e-3 and sae.b_dec_D.abs().max() > 1e-3
    return sae


@pytest.fixture()
def export(trained_sae: TopKSAE, tmp_path: Path) -> Path:
    """``trained_sae`` exported to ``<tmp>/layers.7``."""
    return save_sparsify(
        trained_sae, tmp_path / "layers.7", metadata={"model": "tiny", "layer": 7, "seed": 0}
    )


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_same_codes_and_reconstruction(trained_sae: TopKSAE, export: Path) -> None:
    loaded = load_sparsify(export)
    assert isinstance(loaded, TopKSAE) and loaded.k == K and float(loaded.input_scale) == 1.0
    assert (loaded.d_model, loaded.n_latents) == (D, F)
    assert loaded.aux_k == TopKSAE(D, F, K).aux_k  # the project's default
    x_BD = raw_inputs()
    with torch.no_grad():
        codes_BF, codes_loaded_BF = trained_sae.encode(x_BD), loaded.encode(x_BD)
        assert (codes_BF > 0).sum(-1).float().mean() > 2  # most rows have several active latents
        torch.testing.assert_close(codes_loaded_BF, codes_BF, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(x_BD).recon_BD, trained_sae(x_BD).recon_BD, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            loaded.decode(codes_loaded_BF), trained_sae.decode(codes_BF), atol=1e-5, rtol=0
        )


def test_cfg_json_and_metadata(trained_sae: TopKSAE, export: Path) -> None:
    cfg = json.loads((export / "cfg.json").read_text())
    assert cfg == SPARSIFY_FIELDS  # nothing else: sparsify's loader logs every other key
    assert json.loads((export / PROVENANCE_FILE).read_text()) == {
        "architecture": "topk",
        "model": "tiny",
        "layer": 7,
        "seed": 0,
        "input_scale_folded": pytest.approx(SCALE),
        "sha256": {SPARSIFY_WEIGHTS: hashlib.sha256((export / SPARSIFY_WEIGHTS).read_bytes()).hexdigest()},
    }
    tensors = load_file(str(export / SPARSIFY_WEIGHTS))
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == {
        "encoder.weight": ((F, D), torch.float32),
        "encoder.bias": ((F,), torch.float32),
        "W_dec": ((F, D), torch.float32),
        "b_dec": ((D,), torch.float32),
    }
    assert is_sparsify_folder(export)
    meta = read_sparsify_metadata(export)
    assert meta["format"] == "sparsify" and meta["hookpoint"] == "layers.7"
    assert (meta["k"], meta["d_in"], meta["model"], meta["seed"]) == (K, D, "tiny", 0)
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_metadata_hookpoint_kept_and_own_export_not_sparsify(trained_sae: TopKSAE, tmp_path: Path) -> None:
    folder = save_sparsify(trained_sae, tmp_path / "seed0", metadata={"hookpoint": "layers.3"})
    assert read_sparsify_metadata(folder)["hookpoint"] == "layers.3"
    own = trained_sae.save(tmp_path / "own")  # the project's format: no d_in, other tensor names
    assert not is_sparsify_folder(own)
    assert not is_sparsify_folder(tmp_path / "missing")
    _drop_cfg(folder, "d_in")  # sparsify's weights, but a config without d_in
    assert not is_sparsify_folder(folder)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "cfg.json").write_text("{not json")
    (tmp_path / "junk" / SPARSIFY_WEIGHTS).write_bytes(b"\x00")
    assert not is_sparsify_folder(tmp_path / "junk")


def test_an_older_export_with_the_block_in_cfg_json_is_still_read(export: Path) -> None:
    block = json.loads((export / PROVENANCE_FILE).read_text())
    cfg = json.loads((export / "cfg.json").read_text())
    # as written before the sidecar: the block inside cfg.json
    (export / "cfg.json").write_text(json.dumps({**cfg, "sae_refusal": block}))
    (export / PROVENANCE_FILE).unlink()
    meta = read_sparsify_metadata(export)
    assert (meta["model"], meta["layer"], meta["seed"], meta["sha256"]) == ("tiny", 7, 0, block["sha256"])
    assert isinstance(load_sparsify(export), TopKSAE)
    _edit_tensors(lambda t: t["b_dec"].add_(1.0))(export)
    with pytest.raises(ArtifactError, match=r"sha256 differs from the one recorded in .*cfg\.json"):
        load_sparsify(export)  # its sha256 is still checked


def test_relu_sae_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ReLUSAE.*relu_l1.*SAELens"):
        save_sparsify(ReLUSAE(D, F), tmp_path / "layers.0")
    assert not (tmp_path / "layers.0").exists()


#: The project's SAEs sparsify has no equivalent of (its coders keep each row's k largest codes).
NO_SPARSIFY_EQUIVALENT: dict[str, Callable[[], SparseAutoencoder]] = {
    "batchtopk": lambda: BatchTopKSAE(D, F, K),
    "matryoshka_batchtopk": lambda: MatryoshkaBatchTopKSAE(D, F, K, prefixes=[16, F]),
    "jumprelu_trained": lambda: TrainableJumpReLUSAE(D, F),
    "jumprelu": lambda: JumpReLUSAE(D, F),
}


@pytest.mark.parametrize("arch", list(NO_SPARSIFY_EQUIVALENT))
def test_batchtopk_matryoshka_and_jumprelu_saes_refused(arch: str, tmp_path: Path) -> None:
    sae = NO_SPARSIFY_EQUIVALENT[arch]()
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.fill_(0.3)  # even with its inference threshold set (a JumpReLU SAE, in effect)
    sae.eval()
    match = rf"sparsify has no equivalent of a {type(sae).__name__} \(architecture '{arch}'\)"
    with pytest.raises(ValueError, match=match):
        save_sparsify(sae, tmp_path / "layers.0")
    assert not (tmp_path / "layers.0").exists()


# ----------------------------------------------------------------------------------------- bad folders
def _set_cfg(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg.update(changes)
        (folder / "cfg.json").write_text(json.dumps(cfg))

    return edit


def _drop_cfg(folder: Path, key: str) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg[key]
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / SPARSIFY_WEIGHTS))
        fn(tensors)
        save_file(tensors, str(folder / SPARSIFY_WEIGHTS))

    return edit


BAD_FOLDERS: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "groupmax": (_set_cfg(activation="groupmax"), ValueError, r"cfg\.json.*'activation'.*groupmax"),
    "skip_connection": (_set_cfg(skip_connection=True), ValueError, r"cfg\.json.*'skip_connection'"),
    "W_skip": (
        _edit_tensors(lambda t: t.update(W_skip=torch.zeros(D, D))),
        ValueError,
        r"sae\.safetensors.*'W_skip'.*skip connection",
    ),
    "transcode": (_set_cfg(transcode=True), ValueError, r"cfg\.json.*'transcode'"),
    "missing_key": (_edit_tensors(lambda t: t.pop("W_dec")), ValueError, r"sae\.safetensors.*missing.*W_dec"),
    "extra_key": (
        _edit_tensors(lambda t: t.update(threshold=torch.zeros(F))),
        ValueError,
        r"sae\.safetensors.*unexpected.*threshold",
    ),
    "wrong_shape": (
        _edit_tensors(lambda t: t.update({"encoder.bias": torch.zeros(F + 1)})),
        ValueError,
        r"sae\.safetensors.*'encoder\.bias'.*\(65,\).*\(64,\)",
    ),
    "num_latents_mismatch": (
        _set_cfg(num_latents=2 * F),
        ValueError,
        r"sae\.safetensors.*'encoder\.weight'.*\(64, 16\).*\(128, 16\)",
    ),
    "missing_d_in": (lambda f: _drop_cfg(f, "d_in"), ValueError, r"cfg\.json.*'d_in'"),
    "bad_k": (_set_cfg(k=0), ValueError, r"cfg\.json.*'k'"),
    "missing_weights": (lambda f: (f / SPARSIFY_WEIGHTS).unlink(), FileNotFoundError, r"sae\.safetensors"),
    "missing_cfg": (lambda f: (f / "cfg.json").unlink(), FileNotFoundError, r"cfg\.json"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_refused(case: str, export: Path) -> None:
    edit, error, pattern = BAD_FOLDERS[case]
    edit(export)
    with pytest.raises(error, match=pattern):
        load_sparsify(export, verify=False)  # what is wrong, not only that the file changed (sha256)


# ----------------------------------------------------------------------------- the real library (optional)
def _sparse_coder_module() -> ModuleType:
    """``sparsify.sparse_coder``; without the package ``__init__`` (trainer, ``datasets``) if that fails."""
    try:
        spec = importlib.util.find_spec("sparsify")
    except (ImportError, ValueError) as err:
        pytest.skip(f"eai-sparsify is not importable ({type(err).__name__}: {err})")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("eai-sparsify is not installed (pip install eai-sparsify)")
    try:
        return importlib.import_module("sparsify.sparse_coder")
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "sparsify" or m.startswith("sparsify.")]:
        del sys.modules[name]  # the half-imported package of the failed attempt
    shell = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("sparsify", None, is_package=True))
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = shell
    try:
        return importlib.import_module("sparsify.sparse_coder")
    except ImportError as err:
        del sys.modules["sparsify"]
        pytest.skip(f"sparsify.sparse_coder is not importable ({type(err).__name__}: {err})")


@pytest.fixture(scope="module")
def sparse_coder() -> ModuleType:
    """sparsify's ``sparse_coder`` module (the test is skipped, with the reason, when it cannot be loaded)."""
    return _sparse_coder_module()


def _dense(acts_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
    return torch.zeros(acts_BK.shape[0], F).scatter(1, idx_BK.long(), acts_BK.float())


@pytest.mark.interop
def test_sparsify_reads_our_export(sparse_coder: ModuleType, trained_sae: TopKSAE, export: Path) -> None:
    coder = sparse_coder.SparseCoder.load_from_disk(export)
    assert (coder.d_in, coder.num_latents, coder.cfg.k, coder.dtype) == (D, F, K, torch.float32)
    x_BD = raw_inputs()
    with torch.no_grad():
        out = coder(x_BD)
        ours_BF = trained_sae.encode(x_BD)
        values_BK, indices_BK = trained_sae.encode_sparse(x_BD)
        # the active latents and their values agree (zero codes may sit at different indices)
        torch.testing.assert_close(_dense(out.latent_acts, out.latent_indices), ours_BF, atol=1e-5, rtol=0)
        rows = zip(out.latent_acts, out.latent_indices, values_BK, indices_BK, strict=True)
        for their_acts_K, their_idx_K, our_acts_K, our_idx_K in rows:
            assert set(their_idx_K[their_acts_K > 0].tolist()) == set(our_idx_K[our_acts_K > 0].tolist())
            torch.testing.assert_close(
                their_acts_K.sort().values, our_acts_K.sort().values, atol=1e-5, rtol=0
            )
        torch.testing.assert_close(out.sae_out, trained_sae(x_BD).recon_BD, atol=1e-5, rtol=0)


@pytest.mark.interop
def test_sparsify_loads_our_export_without_a_word(
    sparse_coder: ModuleType,
    export: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """sparsify's loader logs "Dropping extra args {...}" for any cfg.json key it has no field for."""
    caplog.set_level(logging.DEBUG)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coder = sparse_coder.SparseCoder.load_from_disk(export)
    printed = capfd.readouterr()
    assert (printed.out, printed.err) == ("", "")
    assert [str(w.message) for w in caught] == []
    assert [m for r in caplog.records if "extra args" in (m := r.getMessage())] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert (coder.d_in, coder.num_latents, coder.cfg.k) == (D, F, K)
    assert read_sparsify_metadata(export)["model"] == "tiny"  # the provenance is ours to read still


@pytest.mark.interop
def test_load_sparsify_reads_their_save(sparse_coder: ModuleType, tmp_path: Path) -> None:
    config = importlib.import_module("sparsify.config")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        coder = sparse_coder.SparseCoder(D, config.SparseCoderConfig(k=K, num_latents=F))
        with torch.no_grad():  # biases are zero at init: make them matter
            coder.encoder.bias.normal_(0.0, 0.1)
            coder.b_dec.normal_(0.0, 0.5)
    coder.save_to_disk(tmp_path / "layers.3")
    assert is_sparsify_folder(tmp_path / "layers.3")
    sae = load_sparsify(tmp_path / "layers.3")
    meta = read_sparsify_metadata(tmp_path / "layers.3")
    assert meta == {"format": "sparsify", "hookpoint": "layers.3", "k": K, "d_in": D}
    x_BD = raw_inputs()
    with torch.no_grad():
        acts_BK, idx_BK, _ = coder.encode(x_BD)
        torch.testing.assert_close(sae.encode(x_BD), _dense(acts_BK, idx_BK), atol=1e-5, rtol=0)
        torch.testing.assert_close(sae(x_BD).recon_BD, coder.decode(acts_BK, idx_BK), atol=1e-5, rtol=0)


@pytest.mark.interop
def test_sparsify_has_no_batchtopk_jumprelu_or_matryoshka_coder(sparse_coder: ModuleType) -> None:
    """Why save_sparsify refuses those SAEs: sparsify's coder config offers per-row TopK and GroupMax only."""
    config = importlib.import_module("sparsify.config")
    hints = typing.get_type_hints(config.SparseCoderConfig)
    assert set(typing.get_args(hints["activation"])) == {"topk", "groupmax"}
    names = {f.name for f in dataclasses.fields(config.SparseCoderConfig)}
    assert not {n for n in names if any(w in n for w in ("threshold", "jump", "matryoshka", "batch"))}
    assert "k" in names and "multi_topk" in names  # the fields it has: a per-row k
