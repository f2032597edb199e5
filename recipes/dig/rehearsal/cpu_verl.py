"""verl 0.9.1 + vLLM 0.24 (CPU build) on a machine without GPUs: the CPU rehearsal's workarounds, all here.

Loaded ONLY by the CPU rehearsal (``profile=cpu``): the profile puts this module in ``VERL_USE_EXTERNAL_MODULES``
for every Ray worker (the driver needs none of it), and ``import verl`` imports it (``verl/__init__.py`` line 49), in the
trainer, the FSDP workers, the agent loop, the vLLM server actor and vLLM's own worker processes alike. A GPU run
never names it, so nothing here loads there (``tests/test_cpu_profile.py`` checks the composed GPU config and that recipe imports never load this module).

Each workaround is minimal, names the upstream file and line, and is listed with what upstream would need in
docs/cpu_rehearsal.md:

1. ``CPUPlatform`` (registered as ``cpu``; selected by ``VERL_PLATFORM=cpu``): verl has no CPU platform and falls
   back to ``nvidia`` (``verl/plugin/platform/platform_manager.py`` line 117). Its Ray resource name is ``GPU``:
   the rehearsal's Ray head declares one GPU per training process (Ray accepts GPUs it does not have) so verl's
   resource-pool check (``verl/single_controller/ray/base.py`` line 230) and placement groups work unchanged;
   inside the actors torch sees no CUDA and everything runs on the CPU.
2. The forward-only FSDP2 engine (the reference policy) offloads with ``CPUOffloadPolicy(pin_memory=True)``
   (``verl/workers/engine/fsdp/transformer_impl.py`` line 462): pinning host memory needs a CUDA driver.
   Patched to ``pin_memory=False`` when that module is imported.
3. Weight sync: verl's vLLM worker extension loads each received bucket with ``model.load_weights``
   (``verl/workers/rollout/vllm_rollout/utils.py`` line 405), which fails on vLLM's CPU build: after the first
   load vLLM prepacks each linear layer's weight and replaces ``weight`` by an empty parameter without a
   ``weight_loader`` (``dispatch_cpu_unquantized_gemm(remove_weight=True)``,
   ``vllm/model_executor/layers/linear.py`` line 215), so the next load raises ``AttributeError``. ``update_weights_from_ipc`` is replaced by one that
   receives the same buckets over the same shared-memory transport, then hands them to vLLM's own in-place
   reload (``GPUModelRunner.reload_weights(weights_iterator=...)``, ``vllm/v1/worker/gpu_model_runner.py``
   line 5388, inherited by the CPU runner), which restores the checkpoint layout, loads and repacks. verl's
   rollout then clears vLLM's prefix, multimodal and encoder caches as it does on GPUs.

4. Process groups: verl asks for ``"cpu:gloo,<device>:<ccl>"`` (``verl/utils/distributed.py`` line 88), which
   is ``"cpu:gloo,cpu:gloo"`` here and torch refuses the duplicate; the default becomes plain ``"gloo"``.

The environment variables the profile sets beside this module: ``VERL_PLATFORM=cpu`` (1),
``VERL_ENGINE_DEVICE=cuda`` (verl's documented override, ``verl/workers/engine/base.py`` line 405: the FSDP
engine is registered for cuda/npu only, and then runs on this platform's device, the CPU),
``VLLM_CPU_KVCACHE_SPACE`` (vLLM's CPU KV cache, GiB).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable
from types import SimpleNamespace

MODULE = __name__
PLATFORM = "cpu"

# --------------------------------------------------------------------------------------------------------------
# patch a module right after it is imported (no import of heavy modules here: verl is still initialising)

_PENDING: dict[str, list[Callable]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            for patch in _PENDING.pop(fullname, []):
                patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def after_import(name: str, patch: Callable) -> None:
    """Run ``patch(module)`` once ``name`` is imported (now, if it already is); patches run in the order given."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    _PENDING.setdefault(name, []).append(patch)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


# --------------------------------------------------------------------------------------------------------------
# 1. the CPU platform


def _device_module():
    """What verl calls on ``get_torch_device()``: torch's CPU calls plus zero device-memory statistics."""
    import psutil
    import torch

    def mem_get_info(*_):
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    return SimpleNamespace(
        is_available=lambda: True,
        get_device_name=lambda *a: "CPU",
        device_count=lambda: 1,
        current_device=lambda: "cpu",
        set_device=lambda *a: None,
        synchronize=lambda *a: None,
        empty_cache=lambda: None,
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
        get_rng_state=torch.get_rng_state,
        set_rng_state=torch.set_rng_state,
        max_memory_allocated=lambda *a: 0,
        max_memory_reserved=lambda *a: 0,
        memory_allocated=lambda *a: 0,
        memory_reserved=lambda *a: 0,
        reset_peak_memory_stats=lambda *a: None,
        set_per_process_memory_fraction=lambda *a: None,
        mem_get_info=mem_get_info,
        is_initialized=lambda: True,
    )


def register_platform():
    """Register the ``cpu`` platform with verl's public plugin API; returns its class."""
    import torch
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    if PLATFORM in PlatformRegistry.registered_names():
        return PlatformRegistry.get(PLATFORM)

    @PlatformRegistry.register(platform=PLATFORM)
    class CPUPlatform(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = _device_module()

        def is_available(self):
            return True

        def is_platform_available(self, use_smi_check=False):
            return False  # chosen by VERL_PLATFORM=cpu only, never auto-detected

        def current_device(self):
            return "cpu"  # verl passes it to tensor.to(...): an int would mean cuda:N

        def device_count(self):
            return 1

        def set_device(self, device_index):
            return None

        def synchronize(self, device_index=None):
            return None

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            return None

        def empty_cache(self):
            return None

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            return None

        def profiler_stop(self):
            return None

        def ray_resource_name(self):
            return "GPU"  # the rehearsal's Ray head declares them: one per training process

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False  # verl then sends weights through shared memory

        def cudart(self):
            return None

    return CPUPlatform


# --------------------------------------------------------------------------------------------------------------
# 2. the reference model's offload without pinned memory


def _unpinned_offload(module) -> None:
    policy = module.CPUOffloadPolicy

    def unpinned(*args, **kwargs):
        return policy(*args, **{**kwargs, "pin_memory": False})

    module.CPUOffloadPolicy = unpinned


# --------------------------------------------------------------------------------------------------------------
# 3. weight sync through vLLM's own in-place reload


SYNC_DIR_ENV = "DIG_REHEARSAL_SYNC_DIR"


def record_sync(weights) -> None:
    """With DIG_REHEARSAL_SYNC_DIR set (the profile sets it per experiment): what vLLM just loaded, as a
    safetensors file named by time, so a test can hold every sync against the actor's checkpoints and merges."""
    folder = os.environ.get(SYNC_DIR_ENV)
    if not folder:
        return
    import time
    from pathlib import Path

    from safetensors.torch import save_file

    from dig_common.fileio import atomic_output

    Path(folder).mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in weights}
    with atomic_output(Path(folder) / f"sync-{time.time_ns()}.safetensors") as tmp:
        save_file(tensors, str(tmp))


def _reload_based_sync(module) -> None:
    extension = module.vLLMColocateWorkerExtension
    original = extension.update_weights_from_ipc

    def update_weights_from_ipc(self, peft_config=None, base_sync_done=False, use_shm=False):
        if peft_config and base_sync_done:  # LoRA adapters load through add_lora, which works on CPU
            return original(self, peft_config=peft_config, base_sync_done=base_sync_done, use_shm=use_shm)
        import torch
        from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver

        if self.device is None:
            self.device = torch.device("cpu")
        received: list[tuple[str, torch.Tensor]] = []

        def on_bucket(weights, is_last):
            # clone: the receiver reuses its shared-memory buffer for the next bucket
            received.extend((name, tensor.clone()) for name, tensor in weights)

        BucketedWeightReceiver(zmq_handle=self._get_zmq_handle(), device=self.device, use_shm=use_shm).receive_weights(
            on_bucket_received=on_bucket
        )
        self.model_runner.reload_weights(weights_iterator=iter(received))
        record_sync(received)
        received.clear()  # verl's rollout then clears vLLM's prefix, mm and encoder caches (clear_kv_cache)

    extension.update_weights_from_ipc = update_weights_from_ipc


# --------------------------------------------------------------------------------------------------------------
# 4. one process group backend for the one device


def _gloo_only(module) -> None:
    init = module.initialize_global_process_group_ray

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return init(timeout_second=timeout_second, backend=backend or "gloo")

    module.initialize_global_process_group_ray = initialize_global_process_group_ray


def install() -> None:
    """Everything above, for the current process (called on import when VERL_PLATFORM=cpu)."""
    register_platform()
    after_import("verl.workers.engine.fsdp.transformer_impl", _unpinned_offload)
    after_import("verl.workers.rollout.vllm_rollout.utils", _reload_based_sync)
    after_import("verl.utils.distributed", _gloo_only)


if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM:
    install()
