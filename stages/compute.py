"""What the stages that compute on a device share: the device of this run and its runtime section.

Apart from stages/common.py so that the data stages (selection, local_manifest, download, convert, split), which
never touch a device, do not depend on the GPU allocator: a change to it reruns only the stages that use it.
"""

from __future__ import annotations

import logging
import os

import torch
from common import Params

from ahl.core.distributed import DistributedConfig, under_torchrun
from ahl.core.gpus import lease, physical_ids
from ahl.core.runtime import Runtime, RuntimeConfig, configure_determinism, configure_tf32, resolve_device

log = logging.getLogger("stage")


def run_device(params: Params) -> torch.device:
    """This stage's device: params.yaml's, except that ``auto`` on a machine with several GPUs takes the first
    GPU(s) no other run of this project holds and holds them until the stage exits (ahl/core/gpus.py), so that
    queued runs fill every GPU. distributed.nproc > 1 takes that many at once and shows torchrun's processes only
    those; under torchrun (the parent holds them) and with one GPU or none, as asked. The device and the hold
    are kept on ``params`` (one per stage process), so a second call returns the same device."""
    if params._device is not None:
        return params._device
    params._device = device = resolve_device(params.device)
    if params.device != "auto" or device.type != "cuda" or under_torchrun():
        return device
    count, config = torch.cuda.device_count(), params.section("distributed", DistributedConfig)
    if count > 1:
        ids = physical_ids(count, os.environ.get("CUDA_VISIBLE_DEVICES"))
        params._lease = lease(ids, config.nproc, share=config.share_gpus)
        log.info("holding GPU(s) %s of %s", ", ".join(params._lease.ids), ", ".join(ids))
        if config.nproc > 1:  # torchrun replaces this process: it keeps the holds, its ranks see only these
            params._lease.keep_across_exec()
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(params._lease.ids)
        params._device = torch.device("cuda", params._lease.indices[0] if config.nproc == 1 else 0)
    return params._device


def stage_runtime(params: Params, device: torch.device | None = None) -> Runtime:
    """The device (``device``, e.g. this rank's under torchrun, else run_device's) and params.yaml's runtime
    section (autocast, channels_last, compile), with the process-wide determinism switches applied; a stage
    that computes on the device calls this once."""
    config = params.section("runtime", RuntimeConfig)
    configure_determinism(config)
    runtime = Runtime.resolve(device if device is not None else run_device(params), config)
    configure_tf32(runtime)
    return runtime
