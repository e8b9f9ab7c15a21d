"""The model file (docs/model-format.md): one TorchScript file whose extra file
`metadata.json` the LAMMPS plugin and the Python side both read and check against one schema
(model_schema.json), and whose network is covered by a CRC-32 stored in that metadata."""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import torch
from ase.data import chemical_symbols

from . import __version__
from .model import EnergyModel, ModelConfig, build_model, use_fused
from .model_schema import (FIELDS, FORMAT_VERSION, METADATA_RECORD, MetadataError, check_operators, network_crc32,
                           parse_metadata, validate_metadata)
from .ops import called_operators, is_registered

FORMAT = FIELDS["format"]["enum"][0]
METADATA_NAME = "metadata.json"
# the arguments of EnergyModel.forward, in order: what every caller passes; models with
# global inputs (ChargedEnergyModel) take charge_spin after them, models with periodic EFA
# (PeriodicEnergyModel) cell last
INPUTS, CHARGED_INPUTS, PERIODIC_INPUTS, PERIODIC_CHARGED_INPUTS = FIELDS["inputs"]["enum"]

__all__ = ["FORMAT", "FORMAT_VERSION", "MetadataError", "load_model_file", "model_metadata", "read_metadata",
           "save_model_file", "validate_metadata"]


def model_metadata(model: EnergyModel, config: ModelConfig, provenance: dict | None = None,
                   ops: list[str] | None = None) -> dict:
    """The metadata of `model`; `ops`: the operators its scripted form calls (ops.called_operators),
    left out for an eager model (a checkpoint in the calculator)."""
    dtype = next(model.parameters()).dtype
    efa: dict = {"enabled": config.use_efa}
    if config.use_efa:
        block = model.layers[0].global_update.efa
        efa.update(
            grid_points=config.grid_points, b_max=float(config.b_max), r_max=float(config.r_max),
            frequencies=[float(w) for w in block.omega.tolist()],
            D=2 * int(block.omega.numel()), Dv=config.value_dim, grid_rules=model.grid_sizes(),
        )
        if config.periodic_efa:
            efa["k_max"] = float(config.k_max)
    inputs = [INPUTS, CHARGED_INPUTS, PERIODIC_INPUTS, PERIODIC_CHARGED_INPUTS][
        bool(config.global_inputs) + 2 * bool(config.periodic_efa)]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "elements": [chemical_symbols[z] for z in config.atomic_numbers],
        "atomic_numbers": list(config.atomic_numbers),
        "cutoff": float(config.cutoff),
        "num_layers": int(config.num_layers),
        "inputs": list(inputs),
        # values per atom in each forward_ghosts/reverse_ghosts call: the scalar and the three
        # vector components of every feature (EnergyModel.forward)
        "ghost_width": 4 * int(config.features),
        **({"ops": list(ops)} if ops is not None else {}),
        "efa": efa,
        **({"global_inputs": config.global_inputs} if config.global_inputs else {}),
        "dtype": str(dtype).removeprefix("torch."),
        "units": {"energy": "eV", "length": "Angstrom"},
        "periodic": config.periodic,
        "config": config.to_dict(),
        "provenance": {"package_version": __version__, "torch_version": torch.__version__, **(provenance or {})},
    }


def _non_finite_fields(value, name: str = "") -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [name]
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in _non_finite_fields(v, f"{name}.{k}" if name else k)]
    if isinstance(value, (list, tuple)):
        return [bad for i, v in enumerate(value) for bad in _non_finite_fields(v, f"{name}[{i}]")]
    return []


def _check_finite_weights(model: torch.nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"model weight '{name}' holds NaN or inf: the training diverged; export an earlier "
                             "checkpoint or train again with a smaller learning rate")


def _zip_records(source) -> dict[str, bytes]:
    """Records of a TorchScript zip by their name inside its archive folder."""
    with zipfile.ZipFile(source) as z:
        return {info.filename.split("/", 1)[1]: z.read(info) for info in z.infolist() if "/" in info.filename}


def save_model_file(model: EnergyModel, config: ModelConfig, path: str | os.PathLike, provenance: dict | None = None,
                    overwrite: bool = False, fused: bool = True) -> dict:
    """Script the model and write it with its metadata atomically; returns the metadata.
    Refuses weights or metadata that hold NaN or inf. `fused=False` keeps the reference message
    passing and EFA in the file (tests compare the two)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    _check_finite_weights(model)
    if config.use_efa and model.grid_size() != config.grid_points:
        model.set_grid_size(config.grid_points)  # a file starts on its training grid
    use_fused(model.eval(), fused)  # inference: the fused message and EFA operators (first derivatives only)
    try:
        scripted = torch.jit.script(model)
    finally:
        use_fused(model, False)  # the caller's model keeps training on the reference path
    metadata = model_metadata(model, config, provenance, called_operators(scripted))
    bad = _non_finite_fields(metadata)
    if bad:
        raise ValueError(f"metadata field '{bad[0]}' is NaN or inf: a model file holds finite numbers only")
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={METADATA_NAME: "{}"})
    metadata["network_crc32"] = network_crc32(_zip_records(buffer))
    validate_metadata(metadata)
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(metadata, indent=1, allow_nan=False)})
    read_metadata(tmp)  # the written file passes every reader's checks, its digest included
    os.replace(tmp, path)
    return metadata


def _corrupt(path: Path) -> MetadataError:
    return MetadataError(f"{path}: metadata field 'network_crc32' does not match the network: the file is corrupt; "
                         "copy it again or export it again")


def _unreadable(path: Path, reason: str) -> ValueError:
    return ValueError(f"{path} is not a readable TorchScript model file ({reason}); re-export it with efa-export")


def read_metadata(path: str | os.PathLike) -> dict:
    """The validated metadata of a model file, without loading its network; checks the
    network's bytes against the stored CRC-32 and that this process registers every operator
    the network calls (field 'ops'), which loading it needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        records = _zip_records(path)
    except zipfile.BadZipFile as err:
        if "CRC" in str(err):  # the zip's own checksums, which Python checks and libtorch does not
            raise _corrupt(path) from None
        raise _unreadable(path, str(err)) from None
    except OSError as err:
        raise _unreadable(path, str(err)) from None
    if METADATA_RECORD not in records:
        raise ValueError(f"{path} has no {METADATA_NAME}: it was not written by efa-export")
    try:
        metadata = parse_metadata(records[METADATA_RECORD])
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError and NaN are ValueErrors
        raise ValueError(f"{path}: {METADATA_NAME} is not valid JSON ({err})") from None
    try:
        validate_metadata(metadata)
    except MetadataError as err:
        raise MetadataError(f"{path}: {err}") from None
    stored = metadata.get("network_crc32")
    if stored is not None and network_crc32(records) != stored:
        raise _corrupt(path)
    try:
        check_operators(metadata, is_registered)
    except MetadataError as err:
        raise MetadataError(f"{path}: {err}") from None
    return metadata


def load_model_file(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Load a TorchScript model file and its validated metadata; clear errors for bad files."""
    metadata = read_metadata(path)
    return _load_module(Path(path), device), metadata


def _load_module(path: Path, device: str, extra: dict | None = None) -> torch.jit.ScriptModule:
    """torch.jit.load with one line instead of a C++ trace when the file is not a module."""
    try:
        return torch.jit.load(str(path), map_location=device, _extra_files=extra or {})
    except Exception as err:  # torch raises RuntimeError subclasses with long C++ traces
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _unreadable(path, first) from None


def read_model_file(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """The module and the metadata of a model file of any format version, unchecked (conversion)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    extra = {METADATA_NAME: ""}
    module = _load_module(path, device, extra)
    if not extra[METADATA_NAME]:
        raise ValueError(f"{path} has no {METADATA_NAME}: it was not written by efa-export")
    try:
        metadata = parse_metadata(extra[METADATA_NAME])
    except ValueError as err:
        raise ValueError(f"{path}: {METADATA_NAME} is not valid JSON ({err})") from None
    return module, metadata


def rebuild_model(path: str | os.PathLike, dtype: str | None = None) -> tuple[EnergyModel, ModelConfig, dict]:
    """The eager model of a model file of any format version, built by this package's code from
    the file's `config` and weights: how older files become current ones. dtype ("float32",
    "float64"): the weights cast to it; default the file's."""
    module, metadata = read_model_file(path)
    if metadata.get("format") != FORMAT or "config" not in metadata or "dtype" not in metadata:
        raise ValueError(f"{path}: not an efa-deploy model file (no format/config/dtype in its metadata)")
    if dtype not in (None, "float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, not {dtype!r}")
    config = ModelConfig.from_dict(metadata["config"])
    model = build_model(config, getattr(torch, dtype or metadata["dtype"]))
    # non-persistent buffers (the Lebedev rules, the periodic kernel) are the code's, though a
    # scripted module lists them; the training grid and everything else is the file's
    derived = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in module.state_dict().items() if k not in derived}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit the model its config describes ({err})") from None
    if config.use_efa:
        block = model.layers[0].global_update.efa
        model.grid.adopt(config.grid_points, block.grid_points, block.grid_weights)
    return model.eval(), config, metadata


def convert_model_file(old: str | os.PathLike, new: str | os.PathLike, overwrite: bool = False,
                       dtype: str | None = None) -> dict:
    """Write `old` (a model file of any format version) as a current one, its weights cast to dtype
    (default: the file's); returns its metadata."""
    model, config, metadata = rebuild_model(old, dtype)
    provenance = {k: v for k, v in metadata.get("provenance", {}).items() if k != "package_version"}
    provenance["converted_from"] = {"file": Path(old).name, "format_version": metadata.get("format_version"),
                                    "package_version": metadata.get("provenance", {}).get("package_version")}
    return save_model_file(model, config, new, provenance, overwrite)
