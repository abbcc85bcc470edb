"""Resumable `compress` runs: the staging folder (staging.py) keeps the finished layers.

`.OUT.partial/` next to `--out` holds, after decoder layer i is pruned:
- `model-layer-0000i.safetensors`: the pruned layer, already in its final form (a shard of the output);
- `inputs-0000{i+1}.safetensors`: what reaches layer i+1 (the hidden states, per calibration batch;
  the other layer arguments, masks and positions, are recomputed from the embeddings, which is cheap).
  With activations on disk it is where the driver writes that layer's outputs as they come and
  reads them back from, batch by batch (activations.py);
- `progress.json` and `fingerprint.json` (staging.py).

On success the non-layer tensors, config, tokenizer, manifest and the index (last) are added, and
the folder is published as `--out` (artifact.publish).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors import safe_open
from torch import nn

from .. import models
from ..artifact import INDEX, Manifest, finish_folder
from ..errors import UserError
from ..staging import PartialFolder, partial_folder, reading
from . import activations
from .offload import free_layer

REST = "model-rest.safetensors"


def layer_file(index: int) -> str:
    return f"model-layer-{index:05d}.safetensors"


def inputs_file(index: int, rank: int | None = None) -> str:
    """The hidden states reaching layer `index`; in a run of several processes, those of one process's windows."""
    return f"inputs-{index:05d}.safetensors" if rank is None else f"inputs-{index:05d}.rank{rank}.safetensors"


def model_identity(where) -> dict:
    """What identifies a model folder cheaply: its config's hash and its weight files' names and sizes."""
    if isinstance(where, str):
        return {"hub_id": where}
    folder = Path(where)
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return {"config_sha256": config, "weights": {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}}


class LayerStore:
    """What every process of a run does with the staging folder `path`: read offloaded layers
    (`weights`), keep its activations between layers there (`activations_on_disk`), read finished
    layers back. A run of several processes keeps one activations file per process (`rank`) and
    no other process's; process 0's RunFolder writes everything else."""

    path: Path
    model: nn.Module | None = None
    weights = None
    activations_on_disk: bool = False
    rank: int | None = None  # None: the only process

    @property
    def bounds_memory(self) -> bool:
        """Layers offloaded or activations on disk: a run whose point is to stay small."""
        return self.weights is not None or self.activations_on_disk

    def spill(self, index: int) -> Path | None:
        """Where the driver keeps the hidden states that reach layer `index`: None (memory), or a file
        here (for a single process, the file this folder checkpoints them in anyway)."""
        return self.path / inputs_file(index, self.rank) if self.activations_on_disk else None

    def load(self, index: int, layer: nn.Module) -> None:
        if self.weights is not None:
            self.weights.load_into(layer, self._prefix(index), next(self.model.parameters()).dtype)

    def load_finished(self, index: int, layer: nn.Module) -> None:
        """Layer `index` as a finished run saved it (into an offloaded layer's meta tensors too)."""
        path, prefix = self.path / layer_file(index), self._prefix(index)
        with reading(path), safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        own = layer.state_dict()
        layer.load_state_dict({k.removeprefix(prefix): v.to(own[k.removeprefix(prefix)].dtype) for k, v in tensors.items()}, assign=True)

    def forget(self, index: int, layer: nn.Module) -> None:
        """Done with layer `index`: offloaded layers live on disk only."""
        if self.weights is not None:
            free_layer(layer)

    def _prefix(self, index: int) -> str:
        return models.layer_prefix(self.model, index) + "."


class Follower(LayerStore):
    """The staging folder as a process other than 0 of a distributed run sees it (LayerStore)."""

    def __init__(self, out: Path, rank: int, model: nn.Module, *, weights=None, activations_on_disk: bool = False):
        self.path, self.rank, self.model, self.weights, self.activations_on_disk = partial_folder(out), rank, model, weights, activations_on_disk

    def save(self, index: int, layer: nn.Module, report: dict, inputs) -> None:
        if self.activations_on_disk:
            self.spill(index).unlink(missing_ok=True)
        self.forget(index, layer)


class RunFolder(PartialFolder, LayerStore):
    """Process 0's staging folder of a `compress` run (PartialFolder: the lock, the progress, the
    fingerprint), counting finished decoder layers."""

    def __init__(self, out: Path, *, resume: bool, overwrite: bool):
        super().__init__(out, resume=resume, overwrite=overwrite, unit="layers", fresh={"done": 0, "reports": []})
        self.write_dtype = None

    def start(self, fingerprint: dict, model: nn.Module, *, weights=None, write_dtype=None, activations_on_disk: bool = False,
              processes: int = 1) -> None:
        """Record (or, on resume, check) the fingerprint; `weights` is set for offloaded layers.
        Where the activations live is not in the fingerprint: the results are the same bytes. Nor is
        the number of processes: a resumed run may use another (the driver then recomputes the
        hidden states from the finished layers, and keeps none here)."""
        self.check_fingerprint(fingerprint)
        self.model, self.weights, self.write_dtype = model, weights, write_dtype
        self.activations_on_disk = activations_on_disk
        self.rank = 0 if processes > 1 else None

    # -- what the driver (sequential.py) calls ------------------------------------------------------

    @property
    def kept_hidden(self) -> bool:
        """Whether the hidden states reaching the next layer are here (a run of one process keeps them)."""
        return self.done == 0 or (self.path / inputs_file(self.done)).is_file()

    def restore(self, layers: nn.ModuleList, inputs):
        """(first layer to prune, reports so far, its inputs): the finished layers are put back in
        memory unless offloaded, and the saved hidden states replace the freshly captured ones
        (read into memory, or read batch by batch from their file with activations on disk)."""
        k = self.done
        if k == 0:
            return 0, [], inputs
        if self.weights is None:
            for i in range(k):
                self.load_finished(i, layers[i])
        on_disk, path = isinstance(inputs.hidden, activations.OnDisk), self.path / inputs_file(k)
        with reading(path):
            saved = activations.OnDisk(path, inputs.hidden.device if on_disk else inputs.hidden[0].device)
            if saved.shapes != activations.shapes(inputs.hidden):
                raise UserError(f"'{path}' does not match this run's calibration batches: rerun with --overwrite")
            hidden = saved if on_disk else list(saved)
        if on_disk:
            inputs.hidden.path.unlink()  # the captured inputs of layer 0, not needed
        inputs.hidden = hidden
        return k, list(self.progress["reports"]), inputs

    def save(self, index: int, layer: nn.Module, report: dict, inputs) -> None:
        """Checkpoint after layer `index`: its shard, the next layer's inputs (unless the driver
        wrote them there already, activations on disk; a run of several processes keeps none),
        then the progress."""
        prefix = self._prefix(index)
        self.write_tensors(layer_file(index), {prefix + k: v for k, v in layer.state_dict().items()}, dtype=self.write_dtype)
        if self.rank is None and not isinstance(inputs.hidden, activations.OnDisk):
            self.write_tensors(inputs_file(index + 1), {f"batch.{j}": h for j, h in enumerate(inputs.hidden)})
        self.record({"done": index + 1, "reports": self.progress["reports"] + [report]})
        (self.path / inputs_file(index, self.rank)).unlink(missing_ok=True)
        self.forget(index, layer)

    # -- the end ----------------------------------------------------------------------------------

    def finish(self, tokenizer, manifest: Manifest, *, overwrite: bool) -> Manifest:
        """Write the rest of a masked artifact, the manifest, the index last; publish it as `out`."""
        model = self.model
        layers = models.decoder_layers(model)
        prefixes = tuple(self._prefix(i) for i in range(len(layers)))
        dtype = next(model.parameters()).dtype
        rest = {k: self.weights.tensor(k, dtype) if v.is_meta else v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
        head = model.get_output_embeddings()
        if getattr(model.config, "tie_word_embeddings", False) and head is not None:
            head_name = next(n for n, m in model.named_modules() if m is head)
            rest.pop(f"{head_name}.weight", None)  # tied to the input embeddings, re-tied on load
        self.write_tensors(REST, rest, dtype=self.write_dtype)
        model.config.dtype = self.write_dtype or dtype
        finish_folder(self.path, model.config, tokenizer)
        for p in self.path.glob("inputs-*.safetensors"):
            p.unlink()
        weight_map, total = {}, 0
        for name in [layer_file(i) for i in range(len(layers))] + [REST]:
            with safe_open(self.path / name, "pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    sl = f.get_slice(key)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        written = manifest.write(self.path)
        self.write_json(INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        self.publish(overwrite=overwrite)
        return written


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(dtype, 1)
