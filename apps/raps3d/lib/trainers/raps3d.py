"""Fine-tune the served model on the images whose 'final' label users saved, in MONAI Label's train subprocess.

Each structure (label value) of a saved label is a binary target; the library's training loop simulates boxes,
points and corrective clicks on zoom-out and zoom-in samples, starting from the served model. The candidate is
written to a scratch file beside the fine-tuned checkpoint's path and published (atomically moved there) only when
the run finished and it is at least as good as the served model on the validation split; the base checkpoint is
never written. A run that is stopped or killed never touches the served file; the infer task picks a published model
up without a restart (it watches the file). With several GPUs, one training
process runs per GPU (torch.distributed, NCCL), gradients averaged; the batch size is per GPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from raps3d import ImageError, check_volume, load_model, save_model
from raps3d.checkpoint import CheckpointError, read_checkpoint, remove_stale_writes
from raps3d.modeling import build_model
from raps3d.training.data import Case, label_structures
from raps3d.training.sampling import compact_volume
from raps3d.training.train import TrainConfig, train
from raps3d.training.validation import fixed_samples, quick_dice

from ..images import ImageReadError, read_for_model, read_label_on_grid
from ..model_service import fallback_warning, load_served
from ..options import AppOptions, yes_no

logger = logging.getLogger(__name__)

LABEL_TAG = "final"
MIN_VOXELS = 20
MIN_FREE_BYTES = 256 * 2**20  # free space a run needs beside trained_model_path when no checkpoint tells its size


class Raps3DTrain(TrainTask):
    def __init__(self, options: AppOptions, description: str = "Fine-tune Raps-3D on saved (final) labels"):
        super().__init__(description)
        self.options = options
        self.publish_path = Path(options.trained_model_path)
        self.stats_path = self.publish_path.with_name(self.publish_path.stem + "_train_stats.json")

    def config(self):
        # publish: "if_better" (default: only a candidate at least as good as the served model replaces it),
        # "always" (operators who validate elsewhere) or "never" (a trial run: train and report, serve nothing new).
        # freeze_image_encoder: a site's few labelled images tune the prompt encoder and mask decoder; training the
        # image encoder on them too drifted (see the model card) and takes 1.4x the time per step on a CPU.
        return {"steps": 200, "batch_size": 4, "lr": 5e-5, "val_split": 0.2, "seed": 0, "publish": "if_better",
                "freeze_image_encoder": True}

    def stats(self):
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            stats = {}
        alive = stats.get("status") == "RUNNING" and _alive(stats.get("pid"), stats.get("host"),
                                                             stats.get("process_start"))
        latest = None if alive else _launched_since(stats.get("start_ts") or 0.0)
        if latest is not None:  # a later run whose process has not written its stats (yet): not the last run's
            state, launched = latest
            base = {"name": stats.get("name", "raps3d"), "start_ts": launched, "epoch": 0, "total_epochs": None,
                    "best_metric": None}
            if state in ("SUBMITTED", "RUNNING"):
                return {**base, "status": "RUNNING", "message": "starting"}
            return {**base, "status": "FAILED" if state == "ERROR" else "STOPPED",
                    "message": "the run ended before it reported (its log: GET /train/); the served model is "
                               "unchanged"}
        if not stats:
            return {}
        if stats.get("status") == "RUNNING" and not alive:
            # Stopped from the server (it kills the process), killed otherwise, or unable to write its end (a full
            # disk): nothing could record it then.
            self._scratch.unlink(missing_ok=True)
            stats.update(status="STOPPED", message="training stopped before it finished; the served model is "
                         "unchanged")
            try:
                self._write_stats(stats)
            except OSError as e:
                logger.error(f"cannot record the end of the training run in {self.stats_path.name}: {e}")
        return stats

    @property
    def _scratch(self) -> Path:
        return self.publish_path.with_name(f".{self.publish_path.stem}.candidate.pt")

    def _write_stats(self, stats: dict) -> None:
        _write_json(self.stats_path, stats)

    def check_can_publish(self) -> None:
        """OSError (with the reason) when the folder of ``trained_model_path`` cannot be written: a run there could
        record neither its progress nor its result."""
        folder = self.publish_path.parent
        if folder.exists() and not folder.is_dir():
            raise OSError(f"the train task cannot write the folder of trained_model_path ({folder.name!r}): it is a "
                          "file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test."):
                pass
            free = shutil.disk_usage(folder).free
        except OSError as e:
            raise OSError(f"the train task cannot write the folder of trained_model_path ({folder.name!r}): "
                          f"{e.strerror or e}") from None
        # The fp32 candidate, the published fp16 model and the kept previous one: about 4 served checkpoints.
        served = self.options.served_model_path
        needed = 4 * served.stat().st_size if served.is_file() else MIN_FREE_BYTES
        if free < needed:
            raise OSError(f"the folder of trained_model_path ({folder.name!r}) has {free / 2**20:.0f} MiB free; a "
                          f"training run needs about {needed / 2**20:.0f} MiB there")

    def _cases(self, datastore: Datastore) -> tuple[list[Case], dict[str, str]]:
        """The images with a saved final label as training cases (read as inference reads them: HU checked,
        enhanced CT rescaled, DICOM folders), and the images skipped with the reason. The datastore's training list
        works for local folders and for DICOMweb (where final labels are DICOM SEG series, fetched and converted)."""
        cases, skipped = [], {}
        for item in sorted(datastore.datalist(), key=lambda d: d["image"]):
            name = _image_name(item["image"])
            try:
                volume, geometry, orientation = read_for_model(item["image"])  # as inference sees it
                check_volume(volume, geometry.model_spacing)  # what inference refuses (NaN, one slice) is skipped
                label = orientation.volume(read_label_on_grid(item["label"], geometry))
            except (ImageReadError, ImageError, RuntimeError, OSError) as e:
                skipped[name] = str(e)
                logger.warning(f"skipping {name}: {e}")
                continue
            structures = {f"label_{v}": s for v, s in label_structures(label).items() if s.count >= MIN_VOXELS}
            if structures:
                cases.append(Case(name, "datastore", compact_volume(volume), geometry.model_spacing, structures))
            else:  # listed, so that an image counted as labelled but never trained on is seen
                skipped[name] = f"its label holds no structure of at least {MIN_VOXELS} voxels"
            del volume, label  # before the next image is read: one image's full-size arrays at a time
        return cases, skipped

    @property
    def _lock_path(self) -> Path:
        return self.publish_path.with_name(f".{self.publish_path.stem}.train.lock")

    def _take_lock(self):
        """An exclusive lock on the run's files (stats, candidate, published model), or None when another process
        holds it: a run from before a server restart may still be ending. The system releases it with the process,
        however that ends."""
        self.publish_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def run_in_progress(self) -> bool:
        """Whether a training process (this server's, or one that outlived an earlier server) holds the lock."""
        fd = self._take_lock()
        if fd is None:
            return True
        os.close(fd)
        return False

    def __call__(self, request, datastore: Datastore):
        lock = self._take_lock()
        if lock is None:  # nothing written: the stats are the other run's
            raise RuntimeError(f"another training run still holds {self._lock_path.name}; try again once it ended")
        try:
            return self._run(request, datastore)
        finally:
            os.close(lock)

    def _run(self, request, datastore: Datastore):
        for path in (self.publish_path, self._scratch, previous_path(self.publish_path)):
            remove_stale_writes(path)  # half-written files of a run killed while saving
        stats = {"name": request.get("name", "raps3d"), "status": "RUNNING", "start_ts": time.time(), "epoch": 0,
                 "total_epochs": None, "best_metric": None, "pid": os.getpid(), "host": socket.gethostname(),
                 "process_start": _process_start(os.getpid()), "server_pid": os.getppid(),
                 "server_start": _start_or_none(os.getppid())}
        self._write_stats(stats)
        scratch = self._scratch
        try:  # from here on, a failure is recorded in the stats (FAILED, with the error)
            cfg = training_options(request, self.config())
            steps = stats["total_epochs"] = cfg["steps"]
            cases, skipped = self._cases(datastore)
            stats["skipped_images"] = skipped
            self._write_stats(stats)
            if not cases and skipped:  # labels there are, but none can be trained on
                raise ValueError(f"none of the images with a saved '{LABEL_TAG}' label can be trained on (skipped: "
                                 f"{skipped})")
            if not cases:
                raise ValueError(f"no image has a saved '{LABEL_TAG}' label to train on")
            train_cases, val_cases = split_by_image(cases, cfg["val_split"], cfg["seed"])
            if self.options.torch_threads > 0:
                torch.set_num_threads(self.options.torch_threads)

            served = self.options.served_model_path
            if served.exists():
                model, meta, served, failure = load_served(self.options)  # the base, when the fine-tuned one is bad
                if failure:
                    stats["warning"] = fallback_warning(self.options, failure)
                    logger.warning(stats["warning"])
            else:
                logger.warning("no served checkpoint: fine-tuning starts from an untrained 'lite' model")
                model, meta = build_model("lite"), {}
            device, gpus = training_devices(self.options.device)
            model.to(device).eval()
            val_samples = fixed_samples(val_cases, model.config, 16)
            baseline = served_dice(model, val_samples)
            stats.update(baseline_dice=baseline, train_images=[c.name for c in train_cases],
                         val_images=[c.name for c in val_cases], gpus=gpus)
            self._write_stats(stats)

            train_cfg = TrainConfig(steps=steps, batch_size=cfg["batch_size"], lr=cfg["lr"], seed=cfg["seed"],
                                    warmup=min(20, steps), log_every=max(1, min(10, steps)),
                                    save_every=max(1, steps), freeze=FROZEN if cfg["freeze_image_encoder"] else ())
            fine_tune = {"fine_tuned_on": [c.name for c in train_cases], "from": served.name if served.exists()
                         else None, "base": meta.get("train_state", {}).get("step"), "frozen": list(train_cfg.freeze)}
            save_model(model.cpu(), scratch, {**meta, "fine_tune": fine_tune}, half=False)  # the workers' start point
            job = (scratch, train_cases, val_cases, train_cfg, str(self.stats_path), stats)
            if gpus > 1:  # one process per GPU, gradients averaged over NCCL
                torch.multiprocessing.spawn(_fit, args=(gpus, _free_port(), "cuda", *job), nprocs=gpus, join=True)
            else:
                _fit(0, 1, 0, device, *job)
            model, _ = load_model(scratch)
            model.to(device).eval()
            candidate = served_dice(model, val_samples)
            if not math.isfinite(candidate) or not all(torch.isfinite(p).all() for p in model.parameters()):
                raise ValueError("training diverged (weights or validation Dice not finite); try a lower lr")
            published = cfg["publish"] == "always" or (cfg["publish"] == "if_better" and candidate >= baseline)
            if published:
                keep_previous(self.publish_path)
                save_model(model.cpu(), self.publish_path, {**meta, "fine_tune": {**fine_tune, "val_dice": candidate,
                                                                                 "baseline_dice": baseline}})
        except BaseException as e:  # the served model is untouched; say so, and leave no scratch file behind
            stats = {**self.stats(), "status": "FAILED", "end_ts": time.time(),
                     "error": f"{type(e).__name__}: {e}", "message": "training failed; the served model is unchanged"}
            if not _server_alive(stats):  # its output pipe is gone too: a BrokenPipeError is not the run's fault
                stats.update(status="STOPPED", message="training stopped: the server that started it stopped; the "
                             "served model is unchanged")
            scratch.unlink(missing_ok=True)  # first: on a full disk it makes the room to record the failure
            try:
                self._write_stats(stats)
            except OSError as write_error:  # the run's own error is what the task reports
                logger.error(f"training failed ({stats['error']}) and that cannot be recorded in "
                             f"{self.stats_path.name}: {write_error}")
            raise
        finally:
            scratch.unlink(missing_ok=True)
        stats = {**self.stats(), "baseline_dice": baseline}
        stats.update(status="FINISHED", end_ts=time.time(), val_dice=candidate, published=published,
                     best_metric=max(stats.get("best_metric") or 0.0, candidate),
                     message=(("published" if published else "a trial run (publish: never): nothing published"
                               if cfg["publish"] == "never" else "kept the served model")
                              + f": validation Dice {candidate:.3f}, served model's {baseline:.3f}"))
        self._write_stats(stats)
        logger.info(stats["message"])
        return stats


def _launched_since(start_ts: float) -> tuple[str, float] | None:
    """(MONAI Label's status, launch time) of the last train run MONAI Label launched, when it began after
    ``start_ts``; None otherwise. Only the server's process (which answers /info) knows its runs; the training
    process launched none."""
    from monailabel.utils.async_tasks.utils import tasks

    runs = tasks("train")
    if not runs or runs[-1].get("status") == "DONE":  # a finished run wrote its stats
        return None
    try:  # MONAI Label records local time to the second
        launched = datetime.strptime(runs[-1]["start_ts"], "%Y-%m-%d %H:%M:%S").timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    return (str(runs[-1].get("status")), launched) if start_ts < launched - 1.0 else None


def previous_path(publish_path: Path) -> Path:
    """Where the fine-tuned model that a publication replaced is kept (to go back to it: move it over the served
    file)."""
    return publish_path.with_name(f"{publish_path.stem}.previous{publish_path.suffix}")


def keep_previous(publish_path: Path) -> None:
    """Keeps the fine-tuned model about to be replaced as ``previous_path`` (one generation; only one that loads): a
    copy renamed into place, so that the served file is never missing."""
    try:
        read_checkpoint(publish_path)
    except CheckpointError:  # none, or one that does not load: a good previous one stays
        return
    previous = previous_path(publish_path)
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(publish_path, tmp)  # a copy, not a link: a file copied over the served one in place leaves it
        os.replace(tmp, previous)
    finally:
        tmp.unlink(missing_ok=True)


PUBLISH_CHOICES = ("if_better", "always", "never")
MAX_SEED = 2**31 - 1  # torch's seed overflows from 2**63, and a float (JSON) holds whole numbers exactly up to 2**53
# Upper bounds catch typos (steps 1e12, a batch of 512) that would run for months or exhaust the memory: 100,000
# steps of batch 16 take about 11 hours on a GPU, and 64 is four times the largest batch trained so far.
MAX_STEPS = 100_000
MAX_BATCH_SIZE = 64
FROZEN = ("image_encoder.",)  # parameter name prefixes that freeze_image_encoder keeps fixed


def training_options(request: dict, defaults: dict) -> dict:
    """The run's options: the defaults, overridden by the request's values, checked and typed (ValueError with the
    option's name otherwise). Keys the task does not know (MONAI Label adds its own) are ignored."""
    cfg = {**defaults, **{k: request[k] for k in defaults if k in request}}

    def number(key, kind, low, high=None):
        raw = cfg[key]
        try:
            value = None if isinstance(raw, bool) else float(raw)
        except (TypeError, ValueError, OverflowError):  # a 400-digit number overflows a float
            value = None
        if value is None or not np.isfinite(value) or (kind is int and value != int(value)):
            raise ValueError(f"{key} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"{key} must be " + (f"from {low} to {high}" if high is not None else f"at least {low}")
                             + f", got {raw!r}")
        return int(value) if kind is int else value

    out = {"steps": number("steps", int, 1, MAX_STEPS), "batch_size": number("batch_size", int, 1, MAX_BATCH_SIZE),
           "lr": number("lr", float, 1e-12, 1.0), "val_split": number("val_split", float, 0.0, 0.9),
           "seed": number("seed", int, 0, MAX_SEED), "publish": cfg["publish"],
           "freeze_image_encoder": yes_no(cfg["freeze_image_encoder"], "freeze_image_encoder")}
    if out["publish"] not in PUBLISH_CHOICES:
        raise ValueError(f"publish must be 'if_better', 'always' or 'never', got {cfg['publish']!r}")
    return out


def _image_name(path: str) -> str:
    """The image id a datastore path stands for: its file name without the image extension."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_by_image(cases: list[Case], val_split: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(training, validation) cases. An image's side depends only on its name and the seed, so that adding labelled
    images does not move one the served model was trained on into validation, except while one side would be empty
    (it then takes from the other: at least one image validates and one trains). A single labelled image both
    trains and validates."""
    if len(cases) < 2:
        return cases, cases

    rank = {c.name: int(hashlib.sha256(f"{seed}:{c.name}".encode()).hexdigest()[:12], 16) / 16**12 for c in cases}
    ordered = sorted(cases, key=lambda c: rank[c.name])
    n_val = sum(rank[c.name] < val_split for c in ordered)
    n_val = min(max(n_val, 1), len(cases) - 1)  # a split that leaves one side empty takes from the other
    return ordered[n_val:], ordered[:n_val]


def training_devices(option: str) -> tuple[str, int]:
    """(device of the main process, number of GPUs to train on) for the app's ``device`` option: ``auto`` uses every
    GPU there is, ``cuda`` or ``cuda:N`` one (as inference does), ``cpu`` none."""
    if option == "cpu" or not torch.cuda.is_available():
        return "cpu", 0
    if option.startswith("cuda"):
        return option, 1
    return "cuda", torch.cuda.device_count()


def served_dice(model, samples) -> float:
    """Validation Dice at the model's own mask threshold: what users of the served model get."""
    return quick_dice(model, samples, float(model.mask_threshold))


class ServerStopped(RuntimeError):
    """The server that started the run is gone: nothing would publish or report the run's result."""


def _server_alive(stats: dict) -> bool:
    return stats.get("server_pid") is None or _alive(stats["server_pid"], socket.gethostname(),
                                                     stats.get("server_start"))


def _alive(pid, host, process_start=None) -> bool:
    """Whether the training process that wrote the stats still runs (assumed so when it ran on another host). A
    process id that was reused by another process since does not count."""
    if not isinstance(pid, int) or host != socket.gethostname():
        return True
    try:
        if process_start is not None and _process_start(pid) != process_start:
            return False
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _process_start(pid: int):
    """When a process started, as Linux counts it (clock ticks since boot: a wall-clock step does not move it);
    elsewhere psutil's start time. psutil.NoSuchProcess when there is no such process."""
    if not psutil.LINUX:
        return psutil.Process(pid).create_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None


def _start_or_none(pid: int):
    try:
        return _process_start(pid)
    except psutil.NoSuchProcess:  # gone already
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(rank: int, world: int, port: int, device: str, scratch: Path, train_cases, val_cases, cfg: TrainConfig,
         stats_path: str, stats: dict) -> None:
    """Train the model stored at ``scratch`` and write it back there (rank 0). A module-level function, so that
    torch.multiprocessing can start it once per GPU."""
    if world > 1:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, meta = load_model(scratch)
        model.to(f"cuda:{rank}" if world > 1 else device)
        val_samples = fixed_samples(val_cases, model.config, 16)

        def progress(entry):
            if not _server_alive(stats):  # MONAI Label starts the run as its child; an orphan would train on alone
                raise ServerStopped("the server that started this training run stopped")
            stats.update(epoch=entry["step"], loss=entry["loss"], seconds=entry["seconds"])
            if "val_dice" in entry:
                stats["val_dice"] = entry["val_dice"]
                stats["best_metric"] = max(stats["best_metric"] or 0.0, entry["val_dice"])
            _write_json(Path(stats_path), stats)

        train(model, train_cases, scratch, cfg, validate=lambda m: served_dice(m, val_samples),
              dataset_weights={"datastore": 1.0}, progress=progress, meta=meta)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=1, allow_nan=False))
    os.replace(tmp, path)


def _finite(value):
    """``value`` with every NaN or infinite number as None: the stats are served in /info, and JSON has no NaN (a
    diverged loss would otherwise break /info for every client)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
