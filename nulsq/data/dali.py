"""`dataset.loader=dali`: the ImageNet folder decoded by NVIDIA DALI (nvJPEG on the GPU, libjpeg-turbo
on its CPU backend), with the torchvision path's semantics.

What runs where:
- Python workers (DALI's parallel external source, `dataset.num_workers` processes) read each
  JPEG's bytes, parse its header for the size and draw the crop window and flip with the very
  torchvision calls of `nulsq.data.imagenet` (RandomResizedCrop.get_params, then the flip coin,
  from the global generator seeded by (seed, epoch, position)). The shuffle is the same
  DistributedSampler, so order, crops, flips and DDP shards equal the torchvision path's; only
  the decoder's and the resampler's rounding differ.
- DALI decodes just the crop window (ROI decoding, "mixed" = GPU on CUDA), resizes it bilinearly
  with antialiasing (as PIL does), flips and normalises into float32 NCHW, and the batch is
  copied into a torch tensor on the training device.

A resumed epoch (`set_epoch(e, skip)`) starts the source at batch `skip`: the done batches are
never read or decoded. Each batch is a pure function of (seed, epoch, batch), which is what lets
the workers run out of order.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import Pipeline, pipeline_def
from nvidia.dali.backend import TensorListGPU
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image
from torch import Tensor
from torch.utils.data import DistributedSampler

from nulsq.data.bundle import mix_seed
from nulsq.data.imagenet import (
    CHECK,
    MEAN,
    STD,
    FolderSubset,
    draw_crop,
    first_unreadable,
    seeded,
    val_resize,
)
from nulsq.data.split import shard_range
from nulsq.errors import UserError


@dataclass(frozen=True)
class Split:
    """One split's samples and how they are batched (everything a worker needs; picklable).

    Args:
        root: the folder the paths are relative to.
        paths: image file of each position, relative to `root`, UTF-8 bytes (1.3M ImageNet paths
            are 40 MB this way, 270 MB as a str array, and every reader process gets a copy).
        labels: class index of each position.
        batch_size: per-rank batch size.
        image_size: output height = width.
        train: shuffled, cropped at random, last incomplete global batch dropped; else this
            rank's contiguous shard in order, resized and center-cropped.
        flip: random horizontal flips (train only).
        seed: trainer seed.
        rank: this process's rank.
        world_size: number of processes.
    """

    root: str
    paths: np.ndarray
    labels: np.ndarray
    batch_size: int
    image_size: int
    train: bool
    flip: bool
    seed: int
    rank: int
    world_size: int

    def path(self, position: int) -> str:
        return os.path.join(self.root, self.paths[position].decode())

    def sampler(self, epoch: int) -> DistributedSampler:
        """The torchvision path's train sampler (same seed hashing), set to `epoch`."""
        sampler = DistributedSampler(
            range(len(self.paths)), num_replicas=self.world_size, rank=self.rank, shuffle=True,
            seed=mix_seed(self.seed), drop_last=True,
        )
        sampler.set_epoch(epoch)
        return sampler

    def num_batches(self) -> int:
        if self.train:
            return len(self.sampler(0)) // self.batch_size
        start, stop = shard_range(len(self.paths), self.rank, self.world_size)
        return -(-(stop - start) // self.batch_size)


class Source:
    """The external source's callback: BatchInfo -> the batch's bytes, labels and geometry.

    DALI counts its own epochs from 0 at every pipeline build; they map to ours as
    `first_epoch + epoch_idx`, the first one starting at batch `skip`.
    """

    def __init__(self, split: Split, first_epoch: int, skip: int) -> None:
        self.split, self.first_epoch, self.skip = split, first_epoch, skip
        self._order: tuple[int, np.ndarray] | None = None  # per-process cache of one epoch's order

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """The positions in batch `index` of `epoch` (none past the end)."""
        split = self.split
        if index >= split.num_batches():
            return np.zeros(0, dtype=np.int64)
        if not split.train:
            start, stop = shard_range(len(split.paths), split.rank, split.world_size)
            first = start + index * split.batch_size
            return np.arange(first, min(first + split.batch_size, stop), dtype=np.int64)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.fromiter(split.sampler(epoch), dtype=np.int64))
        return self._order[1][index * split.batch_size : (index + 1) * split.batch_size]

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        epoch = self.first_epoch + info.epoch_idx
        index = info.iteration + (self.skip if info.epoch_idx == 0 else 0)
        positions = self.batch(epoch, index)
        if len(positions) == 0:
            raise StopIteration
        columns: tuple[list[np.ndarray], ...] = ([], [], [], [], [])
        for position in positions:
            for column, value in zip(columns, self.sample(epoch, int(position))):
                column.append(value)
        return columns

    def sample(self, epoch: int, position: int) -> tuple[np.ndarray, ...]:
        """(bytes, label, geometry a, geometry b, flip) of one sample.

        Train: a = the crop's (top, left), b = its (height, width), in the source image.
        Val: a = the resized (height, width), b = the center crop's (top, left) in it.
        """
        split = self.split
        path = split.path(position)
        data = np.fromfile(path, dtype=np.uint8)
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                if split.train:
                    with seeded(split.seed, epoch, position):
                        top, left, height, width, flip = draw_crop(image, split.flip)
                    a, b = (top, left), (height, width)
                else:
                    a, b, flip = *val_geometry(image.size, split.image_size), False
        except (OSError, SyntaxError, ValueError) as error:
            raise UserError(f"cannot read image {path}: {error}; {CHECK}") from None
        label = np.array(split.labels[position], dtype=np.int64)
        return (
            data, label, np.array(a, np.int32), np.array(b, np.int32), np.array(flip, np.int32)
        )


def val_geometry(size: tuple[int, int], image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((height, width) after Resize(val_resize(image_size)), (top, left) of CenterCrop(image_size)),
    computed as torchvision computes them for an image of PIL `size` (width, height)."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = val_resize(image_size), int(val_resize(image_size) * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return (new_h, new_w), (top, left)


@pipeline_def
def _graph(source: Source, image_size: int, train: bool, workers: int, gpu: bool, layout: str):
    """The DALI graph: external source -> decode (crop window only, for train) -> resize ->
    (val: center crop) -> flip + normalise to float32 in `layout` (CHW or HWC)."""
    # each worker prepares a whole batch; keep all of them busy
    parallel = dict(parallel=True, prefetch_queue_depth=max(2, workers)) if workers > 0 else {}
    data, labels, a, b, flip = fn.external_source(
        source, num_outputs=5, batch=True, batch_info=True,
        dtype=[types.UINT8, types.INT64, types.INT32, types.INT32, types.INT32], **parallel,
    )
    decoder = "mixed" if gpu else "cpu"
    # EXIF orientation is ignored, as PIL's ImageFolder loader ignores it.
    if train:  # decode only the crop window, then resize it (crop-then-resize, as resized_crop)
        images = fn.decoders.image_slice(
            data, a, b, axis_names="HW", device=decoder, output_type=types.RGB,
            adjust_orientation=False,
        )
        images = fn.resize(
            images, size=[image_size, image_size], interp_type=types.INTERP_LINEAR, antialias=True
        )
    else:  # resize the whole image, then center-crop it
        images = fn.decoders.image(
            data, device=decoder, output_type=types.RGB, adjust_orientation=False
        )
        images = fn.resize(
            images, size=fn.cast(a, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        images = fn.slice(images, b, [image_size, image_size], axis_names="HW")
    images = fn.crop_mirror_normalize(
        images, mirror=flip, mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
        dtype=types.FLOAT, output_layout=layout,
    )
    return images, labels


class DaliLoader:
    """One split through a DALI pipeline; follows the Loader protocol.

    Args:
        split: the samples and batching.
        device: where batches are delivered; CUDA decodes on that GPU, CPU on DALI's CPU backend.
        workers: Python reader processes (0 reads in this process, for tests and debugging).
        threads: DALI's own CPU threads.
        channels_last: deliver [B, C, H, W] tensors in channels_last memory (DALI writes HWC; the
            trainer's conversion is then a no-op) instead of contiguous NCHW.
    """

    def __init__(
        self, split: Split, device: torch.device, workers: int, threads: int, channels_last: bool
    ) -> None:
        self.split, self.device, self.workers, self.threads = split, device, workers, threads
        self.channels_last = channels_last
        self.epoch, self.skip = 0, 0
        self._pipe: Pipeline | None = None
        self._next: tuple[int, int] | None = None  # the (epoch, skip) the built pipeline gives next

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if self.split.train:
            self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.split.num_batches()

    def _pipeline(self) -> Pipeline:
        """The built pipeline, rebuilt only when it would not give (epoch, skip) next (a resume, a
        jump, or an epoch left unfinished), since a build restarts the reader processes."""
        if self._pipe is None or self._next != (self.epoch, self.skip):
            self._pipe = None  # shuts the old workers down
            gpu = self.device.type == "cuda"
            pipe = _graph(
                Source(self.split, self.epoch, self.skip), self.split.image_size, self.split.train,
                self.workers, gpu, "HWC" if self.channels_last else "CHW",
                batch_size=self.split.batch_size,
                num_threads=max(1, self.threads), device_id=(self.device.index or 0) if gpu else None,
                seed=mix_seed(self.split.seed), py_num_workers=max(1, self.workers),
                # spawn, not fork: the trainer has usually initialised CUDA by now
                py_start_method="spawn",
            )
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        pipe = self._pipeline()
        self._next = None  # until this pass ends
        index = self.skip
        # CUDA: outputs ready on torch's stream (copied on it below), no host synchronisation
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while True:
            try:
                images, labels = pipe.run(stream)
            except StopIteration:
                break
            except Exception as error:
                # a failed pipeline is not reused; drop it now (its threads and reader processes)
                # rather than when the traceback that holds this frame goes
                self._pipe = pipe = None
                raise self._explain(error, index) from error
            images = self._to_torch(images, stream)
            if self.channels_last:  # [B, H, W, C] -> a [B, C, H, W] view with channels_last strides
                images = images.permute(0, 3, 1, 2)
            yield images, self._to_torch(labels, stream)
            index += 1
        pipe.reset()
        self._next = (self.epoch + 1, 0) if self.split.train else (self.epoch, self.skip)

    def _to_torch(self, batch, stream) -> Tensor:
        """A copy of one output in a torch tensor on the training device (GPU outputs are copied
        on `stream`, torch's current one; the labels come from the CPU)."""
        on_gpu = isinstance(batch, TensorListGPU)
        tensor = batch.as_tensor()
        dtype = torch.float32 if tensor.dtype == types.FLOAT else torch.int64
        out = torch.empty(tensor.shape(), dtype=dtype, device=self.device if on_gpu else "cpu")
        feed_ndarray(tensor, out, cuda_stream=stream if on_gpu else None)
        return out.to(self.device, non_blocking=True)

    def _explain(self, error: Exception, index: int) -> Exception:
        """One line naming the unreadable file among the batches in flight, when there is one."""
        if isinstance(error, UserError):
            return error
        message = str(error)
        for line in reversed(message.splitlines()):  # a worker's error arrives as its traceback
            if "UserError: " in line:
                return UserError(line.split("UserError: ", 1)[1])
        epoch = self.epoch
        ahead = range(index, index + max(2, self.workers) + 3)  # the source prefetches batches
        source = Source(self.split, epoch, 0)
        paths = [self.split.path(p) for i in ahead for p in source.batch(epoch, i)]
        bad = first_unreadable(paths)
        if bad is None:
            return error
        return UserError(f"cannot decode image {bad[0]}: {bad[1]}; {CHECK}")


def dali_loaders(
    train_set: FolderSubset,
    val_set: FolderSubset,
    *,
    batch_size: int,
    eval_batch_size: int,
    image_size: int,
    flip: bool,
    seed: int,
    rank: int,
    world_size: int,
    device: torch.device,
    workers: int,
) -> tuple[DaliLoader, DaliLoader]:
    """(train, val) DaliLoaders over the files of the torchvision path's subsets (per-rank batch
    sizes; `workers` reader processes and as many DALI threads). On CUDA the images come in
    channels_last memory, the trainer's default there (trainer.channels_last=auto); on CPU NCHW."""

    def split(subset: FolderSubset, size: int, train: bool) -> Split:
        root, samples = subset.folder.root, subset.folder.samples
        cut = len(os.path.join(root, ""))  # ImageFolder's paths are os.path.join(root, class, file)
        paths = np.asarray([samples[i][0][cut:].encode() for i in subset.indices], dtype=np.bytes_)
        labels = np.asarray([samples[i][1] for i in subset.indices], dtype=np.int64)
        return Split(
            root, paths, labels, size, image_size, train, flip and train, seed, rank, world_size
        )

    threads, channels_last = max(1, workers), device.type == "cuda"
    return (
        DaliLoader(split(train_set, batch_size, True), device, workers, threads, channels_last),
        DaliLoader(split(val_set, eval_batch_size, False), device, workers, threads, channels_last),
    )
