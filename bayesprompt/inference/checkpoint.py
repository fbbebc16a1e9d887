"""Training checkpoints: weights-only files holding the param store, optimiser and RNG states.

A checkpoint is written atomically after every epoch (`save_checkpoint`) and read back with
`torch.load(weights_only=True)`, so a received file can hold tensors and containers only.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pyro
import torch

from bayesprompt.errors import UserError, first_line
from bayesprompt.files import save_torch

#: Keys every checkpoint holds.
CHECKPOINT_KEYS = ("epoch", "history", "identity", "train_config", "param_store", "optimizer",
                   "group_optimizers", "rng", "cuda_rng", "reference_loss")


def _corrupt(path: Path, problem: str) -> UserError:
    return UserError(
        f"The checkpoint {path} cannot be used: {problem}. It may have been cut short by a full "
        "disk or a copy that did not finish. Restore it from a backup, or delete it (and the "
        "run folder's results) and train again."
    )


def load_checkpoint(path: Path, identity: dict, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint (tensors and plain containers only: `weights_only=True`), check it
    belongs to this run (`identity`) and restore the values of the param store, on `device`.

    Run it inside the program's `param_scope()`, whose store must already hold the program's
    parameters (`PromptModel.initialize_parameters`), so that their constraints come from the
    program, not from the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # torch names a refused class or function
            raise _corrupt(path, "it is truncated, corrupt or not a checkpoint "
                           f"({first_line(error)})") from None
        raise UserError(
            f"The checkpoint {path} is refused: besides tensors it holds pickled Python objects, "
            "and loading those could run code from the file. The checkpoints this project "
            "writes hold tensors and plain containers only, so this one was written by other "
            "code or altered. Use a run folder from a source you trust, or delete the "
            "checkpoint (and the run folder's results) and train again.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _corrupt(path, f"it is truncated, corrupt or not a checkpoint ({error})") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise _corrupt(path, f"it lacks some of {', '.join(CHECKPOINT_KEYS)}")
    mismatched = [key for key in identity if state["identity"].get(key) != identity[key]]
    if mismatched:
        details = "; ".join(f"{k}: checkpoint has {state['identity'].get(k)!r}, "
                            f"this run has {identity[k]!r}" for k in mismatched)
        raise UserError(
            f"The checkpoint {path} belongs to another run ({details}). Use a new --out "
            "folder, or the options the checkpoint was trained with."
        )
    store = pyro.get_param_store()
    current = store.get_state()
    saved = state["param_store"]
    if set(saved) != set(current["params"]):
        raise UserError(
            f"The checkpoint {path} holds the parameters {sorted(saved)}, but this model has "
            f"{sorted(current['params'])}: it was written by another version of the model "
            "file. Use a new --out folder, or the model file it was trained with."
        )
    wrong = [f"{name}: checkpoint {tuple(value.shape)}, model "
             f"{tuple(current['params'][name].shape)}" for name, value in saved.items()
             if value.shape != current["params"][name].shape]
    if wrong:
        raise UserError(f"The checkpoint {path} holds parameters of other shapes "
                        f"({'; '.join(wrong)}): it was written by another version of the model "
                        "file. Use a new --out folder, or the model file it was trained with.")
    with torch.no_grad():  # into the existing tensors: optimisers and autoguides hold them
        for name, value in saved.items():
            current["params"][name].copy_(value.to(device))
    return state


def rng_state(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU RNG state, and the states of every CUDA device when training on CUDA."""
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return torch.get_rng_state(), cuda


def set_rng_state(cpu: torch.Tensor, cuda: list[torch.Tensor]) -> None:
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def save_checkpoint(path: Path, state: dict, device: torch.device) -> None:
    """Write the training `state` (every key of CHECKPOINT_KEYS but the param store and RNG
    states, which are read here) atomically to `path`."""
    cpu_rng, cuda_rng = rng_state(device)
    params = {name: value.detach().cpu()
              for name, value in pyro.get_param_store().get_state()["params"].items()}
    save_torch(path, {**state, "param_store": params, "rng": cpu_rng, "cuda_rng": cuda_rng})
