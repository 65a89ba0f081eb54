"""SAE files checked on write and read in every format: sha256 per tensor file, non-finite values, bad files.

Each case builds a tiny SAE in ``tmp_path``, writes it in one of the three layouts (the project's export,
sparsify, SAELens), damages one file the way the issue describes, and expects one clear error that names the
file (and the tensor), never a traceback from safetensors or ``load_state_dict``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_refusal.cli import main
from sae_refusal.errors import ArtifactError
from sae_refusal.sae import TopKSAE, load_sae
from sae_refusal.sae.formats import export_sae, resolve_sae_path, sae_metadata
from sae_refusal.sae.formats.saelens import SAELENS_WEIGHTS, save_saelens
from sae_refusal.sae.loading import find_sae_exports

D, F, K = 8, 32, 4

#: format -> (tensor file, name of the encoder weight in it)
LAYOUTS = {
    "sae_refusal": ("sae.safetensors", "W_enc_FD"),
    "sparsify": ("sae.safetensors", "encoder.weight"),
    "saelens": (SAELENS_WEIGHTS, "W_enc"),
}


def tiny_sae(seed: int = 0) -> TopKSAE:
    sae = TopKSAE(D, F, K, generator=torch.Generator().manual_seed(seed))
    sae.set_input_scale(0.7)
    return sae


def write(sae: TopKSAE, folder: Path, fmt: str) -> Path:
    """``sae`` in ``fmt``'s layout at ``folder`` (layer 2 recorded)."""
    if fmt == "sae_refusal":
        return sae.save(folder, metadata={"layer": 2, "model": "tiny"})
    return export_sae(sae, folder, fmt, metadata={"layer": 2, "model": "tiny"})


def flip_exponent_bit(path: Path, tensor: str, index: int = 0) -> None:
    """Flip one exponent bit of one float32 of ``tensor`` in place (the file keeps its size)."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start, _ = json.loads(data[8 : 8 + header_len])[tensor]["data_offsets"]
    data[8 + header_len + start + 4 * index + 3] ^= 0x20  # byte 3 of a little-endian float32: sign + exponent
    path.write_bytes(bytes(data))


def drop_sha256(folder: Path, fmt: str) -> None:
    """The ``cfg.json`` as an export written before sha256s were recorded (or by the library itself)."""
    if fmt == "sparsify":  # the provenance sidecar, which sparsify itself never writes
        (folder / "sae_refusal_provenance.json").unlink()
        return
    cfg = json.loads((folder / "cfg.json").read_text())
    if fmt == "sae_refusal":
        del cfg["sha256"]
    else:
        del cfg["metadata"]["sae_refusal"]["sha256"]
    (folder / "cfg.json").write_text(json.dumps(cfg))


def rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_a_flipped_exponent_bit_is_caught_by_the_recorded_sha256(fmt: str, tmp_path: Path) -> None:
    sae = tiny_sae()
    folder = write(sae, tmp_path / "sae", fmt)
    weights, name = LAYOUTS[fmt]
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_sae(folder)(x).recon_BD, sae(x).recon_BD, rtol=1e-5, atol=1e-6)
    flip_exponent_bit(folder / weights, name)
    recorded_in = r"(cfg|sae_refusal_provenance)\.json"  # sparsify's export: the provenance sidecar
    with pytest.raises(
        ArtifactError, match=rf"{weights}: sha256 differs from the one recorded in .*{recorded_in}"
    ):
        load_sae(folder)
    altered = load_sae(folder, verify=False)  # on purpose: loads, and the weights are not the saved ones
    assert not torch.allclose(altered(x).recon_BD, sae(x).recon_BD)
    drop_sha256(folder, fmt)  # an export written before sha256s were recorded still loads
    assert isinstance(load_sae(folder), TopKSAE)


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_non_finite_weights_are_refused_naming_the_file_and_tensor(fmt: str, tmp_path: Path) -> None:
    folder = write(tiny_sae(), tmp_path / "sae", fmt)
    weights, name = LAYOUTS[fmt]
    drop_sha256(folder, fmt)  # as a library would write it: no sha256 to stop the read first

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[name][0, 1] = float("nan")

    rewrite(folder / weights, poison)
    with pytest.raises(
        ArtifactError, match=rf"{weights}: tensor '{name}' holds 1 non-finite value\(s\) \(nan\)"
    ):
        load_sae(folder)


def test_a_hub_sae_with_nan_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "snapshot"
    folder = export_sae(tiny_sae(), repo / "layers.2", "sparsify", metadata={"layer": 2})
    drop_sha256(folder, "sparsify")
    rewrite(folder / "sae.safetensors", lambda t: t["b_dec"].fill_(float("inf")))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *_a, **_k: str(repo))
    with pytest.raises(ArtifactError, match=r"layers\.2/sae\.safetensors: tensor 'b_dec' holds 8 .*\(inf\)"):
        load_sae("hf://owner/repo/layers.2")


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_writers_refuse_non_finite_weights_and_write_nothing(fmt: str, tmp_path: Path) -> None:
    sae = tiny_sae()
    with torch.no_grad():
        sae.W_dec_FD[3, 0] = float("nan")
    with pytest.raises(ArtifactError, match=r"sae.*\.safetensors: tensor '.*' holds 1 non-finite"):
        write(sae, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_an_empty_tensor_file_is_named(fmt: str, tmp_path: Path) -> None:
    folder = write(tiny_sae(), tmp_path / "sae", fmt)
    weights, _ = LAYOUTS[fmt]
    (folder / weights).write_bytes(b"")
    for verify in (True, False):  # "empty", not only "sha256 differs"
        with pytest.raises(
            ArtifactError, match=rf"{weights}: empty file \(0 bytes\), not a safetensors file"
        ):
            load_sae(folder, verify=verify)


@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_a_cfg_json_that_does_not_parse_is_named(fmt: str, tmp_path: Path) -> None:
    folder = write(tiny_sae(), tmp_path / "sae", fmt)
    (folder / "cfg.json").write_text('{"architecture": "topk", "d_model": ')
    with pytest.raises(ArtifactError, match=r"sae/cfg\.json: not valid JSON"):
        load_sae(folder)
    with pytest.raises(ArtifactError, match=r"sae/cfg\.json: not valid JSON"):
        sae_metadata(folder)


@pytest.mark.parametrize(("field", "value"), [("d_model", 2 * D), ("n_latents", 2 * F)])
def test_a_cfg_json_shape_that_does_not_fit_the_weights_is_named(
    field: str, value: int, tmp_path: Path
) -> None:
    folder = tiny_sae().save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg[field] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    shape = r"sae\.safetensors: tensor '\w+' has shape .*cfg\.json \(d_model \d+, n_latents \d+\) gives"
    with pytest.raises(ArtifactError, match=shape) as error:
        load_sae(folder)
    assert f"{field} {value}" in str(error.value)


def test_a_hub_spec_stays_a_hub_spec_through_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Path("hf://owner/repo/layers.2")`` is ``hf:/owner/repo/layers.2``: still sent to the hub."""
    repo = tmp_path / "snapshot"
    tiny_sae().save(repo / "layers.2", metadata={"layer": 2})
    asked: list[tuple[str, Any]] = []

    def download(repo_id: str, allow_patterns: Any = None) -> str:
        asked.append((repo_id, allow_patterns))
        return str(repo)

    monkeypatch.setattr("huggingface_hub.snapshot_download", download)
    assert resolve_sae_path(Path("hf://owner/repo/layers.2")) == repo / "layers.2"
    assert find_sae_exports("hf://owner/repo/layers.2") == {"layers.2": repo / "layers.2"}
    assert asked == [("owner/repo", ["layers.2/*"])] * 2


def test_features_sends_an_hf_spec_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(*_: Any, **__: Any) -> str:
        raise OSError("offline mode")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    config = tmp_path / "x.yaml"
    config.write_text("data: {layer: 2}\n")  # read as YAML first; its sections only after the hub is asked
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "features",
                "--config",
                str(config),
                "--sae_dir",
                "hf://owner/repo/layers.2",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    err = f"{exit_.value.code} {capsys.readouterr().err}"  # a SystemExit message or the one-line error
    assert "hf://owner/repo/layers.2: not a local folder, and the hub repo 'owner/repo' could not be" in err


def _saelens_folder(folder: Path, hook_name: str) -> Path:
    """A SAELens folder as SAELens writes it: no project provenance, the hookpoint in ``hook_name``."""
    save_saelens(tiny_sae(), folder, metadata={"hook_name": hook_name})
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["sae_refusal"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_a_saelens_sae_of_a_hookpoint_that_is_no_block_output_is_refused(tmp_path: Path) -> None:
    mid = _saelens_folder(tmp_path / "mid", "blocks.2.hook_resid_mid")
    with pytest.raises(
        ArtifactError, match=r"mid: hookpoint 'blocks\.2\.hook_resid_mid' .* not a residual-stream"
    ):
        sae_metadata(mid)
    post = _saelens_folder(tmp_path / "post", "blocks.2.hook_resid_post")
    assert sae_metadata(post)["layer"] == 2


def test_export_out_under_a_file_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_sae().save(tmp_path / "run" / "seed0", metadata={"layer": 2})
    (tmp_path / "afile").write_text("x")
    args = ["export", "--sae_dir", str(tmp_path / "run"), "--format", "sparsify"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(tmp_path / "afile" / "sub")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"error: --out: {tmp_path / 'afile' / 'sub'} cannot be created: {tmp_path / 'afile'} is a file" in err
    )
    assert ".tmp-" not in err


def test_export_refuses_a_source_with_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tiny_sae().save(tmp_path / "run" / "seed0", metadata={"layer": 2})
    drop_sha256(folder, "sae_refusal")
    rewrite(folder / "sae.safetensors", lambda t: t["W_dec_FD"].fill_(float("nan")))
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--sae_dir",
                str(tmp_path / "run"),
                "--format",
                "saelens",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert "seed0/sae.safetensors: tensor 'W_dec_FD' holds 256 non-finite value(s)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _imported_modules(path: Path) -> set[str]:
    """Every ``sae_refusal`` module ``path`` imports, at the top or inside a function."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("sae_refusal.")}


def test_the_sae_base_and_formats_do_not_import_each_others_loaders() -> None:
    """``sae/base.py`` <-> ``sae/formats/`` was a cycle (base's load_sae imported formats lazily): the loaders
    now live above both in ``sae/loading.py``, which neither imports."""
    package = Path(__file__).resolve().parents[1] / "sae_refusal" / "sae"
    base = _imported_modules(package / "base.py")
    assert not {m for m in base if m.startswith(("sae_refusal.sae.formats", "sae_refusal.sae.loading"))}
    for path in sorted((package / "formats").glob("*.py")):
        assert not {m for m in _imported_modules(path) if m.startswith("sae_refusal.sae.loading")}, path.name
    assert "sae_refusal.sae.files" in base  # what both need sits below both
