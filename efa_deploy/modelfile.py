"""The model-file contract (DESIGN.md section 5): one TorchScript file whose extra file
`metadata.json` the LAMMPS plugin and the Python side both read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from ase.data import chemical_symbols

from . import __version__
from .model import EnergyModel, ModelConfig

FORMAT = "efa-deploy-model"
FORMAT_VERSION = 2  # 2: the file carries Lebedev rules and chooses its grid at run time (efa.grid_rules)
METADATA_NAME = "metadata.json"
# (field, type) pairs every reader relies on; the plugin checks the same list
REQUIRED_FIELDS = (
    ("format", str), ("format_version", int), ("elements", list), ("atomic_numbers", list),
    ("cutoff", float), ("num_layers", int), ("efa", dict), ("dtype", str), ("units", dict),
    ("periodic", bool), ("config", dict), ("provenance", dict),
)


def model_metadata(model: EnergyModel, config: ModelConfig, provenance: dict | None = None) -> dict:
    dtype = next(model.parameters()).dtype
    efa: dict = {"enabled": config.use_efa}
    if config.use_efa:
        block = model.layers[0].global_update.efa
        efa.update(
            grid_points=config.grid_points, b_max=float(config.b_max), r_max=float(config.r_max),
            frequencies=[float(w) for w in block.omega.tolist()],
            D=2 * int(block.omega.numel()), Dv=config.value_dim, grid_rules=model.grid_sizes(),
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "elements": [chemical_symbols[z] for z in config.atomic_numbers],
        "atomic_numbers": list(config.atomic_numbers),
        "cutoff": float(config.cutoff),
        "num_layers": int(config.num_layers),
        "efa": efa,
        "dtype": str(dtype).removeprefix("torch."),
        "units": {"energy": "eV", "length": "Angstrom"},
        "periodic": config.periodic,
        "config": config.to_dict(),
        "provenance": {"package_version": __version__, **(provenance or {})},
    }


def save_model_file(model: EnergyModel, config: ModelConfig, path: str | os.PathLike, provenance: dict | None = None,
                    overwrite: bool = False) -> dict:
    """Script the model and write it with its metadata atomically; returns the metadata."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")
    metadata = model_metadata(model, config, provenance)
    if config.use_efa and model.grid_size() != config.grid_points:
        model.set_grid_size(config.grid_points)  # a file starts on its training grid
    scripted = torch.jit.script(model.eval())
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(metadata, indent=1)})
    os.replace(tmp, path)
    return metadata


def validate_metadata(metadata: dict, source: str = "model file") -> dict:
    for name, kind in REQUIRED_FIELDS:
        if name not in metadata:
            raise ValueError(f"{source}: metadata field '{name}' is missing")
        value = metadata[name]
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise ValueError(f"{source}: metadata field '{name}' should be {kind.__name__}, got {type(value).__name__}")
    if metadata["format"] != FORMAT:
        raise ValueError(f"{source}: metadata field 'format' is {metadata['format']!r}, expected {FORMAT!r}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{source}: metadata field 'format_version' is {metadata['format_version']}, this package reads "
            f"{FORMAT_VERSION}; convert it with `efa-export --from-model OLD.pt -o NEW.pt`"
        )
    if len(metadata["elements"]) != len(metadata["atomic_numbers"]):
        raise ValueError(f"{source}: metadata fields 'elements' and 'atomic_numbers' differ in length")
    return metadata


def load_model_file(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """Load a TorchScript model file and its validated metadata; clear errors for bad files."""
    module, metadata = read_model_file(path, device)
    return module, validate_metadata(metadata, str(path))


def read_model_file(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """The module and the metadata of a model file of any format version, unchecked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    extra = {METADATA_NAME: ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as err:  # torch raises RuntimeError subclasses with long C++ traces
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable TorchScript model file ({first}); re-export it with efa-export") from None
    if not extra[METADATA_NAME]:
        raise ValueError(f"{path} has no {METADATA_NAME}: it was not written by efa-export")
    try:
        metadata = json.loads(extra[METADATA_NAME])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {METADATA_NAME} is not valid JSON ({err})") from None
    return module, metadata


def rebuild_model(path: str | os.PathLike) -> tuple[EnergyModel, ModelConfig, dict]:
    """The eager model of a model file of any format version, built by this package's code from
    the file's `config` and weights: how older files become current ones."""
    module, metadata = read_model_file(path)
    if metadata.get("format") != FORMAT or "config" not in metadata or "dtype" not in metadata:
        raise ValueError(f"{path}: not an efa-deploy model file (no format/config/dtype in its metadata)")
    config = ModelConfig.from_dict(metadata["config"])
    model = EnergyModel(config).to(getattr(torch, metadata["dtype"]))
    # the rules are the code's; the training grid and everything else is the file's
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("grid.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit the model its config describes ({err})") from None
    if config.use_efa:
        block = model.layers[0].global_update.efa
        model.grid.adopt(config.grid_points, block.grid_points, block.grid_weights)
    return model.eval(), config, metadata


def convert_model_file(old: str | os.PathLike, new: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write `old` (a model file of any format version) as a current one; returns its metadata."""
    model, config, metadata = rebuild_model(old)
    provenance = {k: v for k, v in metadata.get("provenance", {}).items() if k != "package_version"}
    provenance["converted_from"] = {"file": Path(old).name, "format_version": metadata.get("format_version"),
                                    "package_version": metadata.get("provenance", {}).get("package_version")}
    return save_model_file(model, config, new, provenance, overwrite)
