"""A broken weight sync for tests/test_cpu_rehearsal.py's negative test, loaded after the CPU workarounds through
VERL_USE_EXTERNAL_MODULES: vLLM's worker still receives every sync (and the workaround records it), but the
weights never reach the model, so vLLM keeps serving whatever it had (its dummy start-up weights)."""

from recipes.dig.rehearsal.cpu_verl import after_import


def _never_load(module) -> None:
    extension = module.vLLMColocateWorkerExtension
    receive_and_load = extension.update_weights_from_ipc

    def update_weights_from_ipc(self, *args, **kwargs):
        self.model_runner.reload_weights = lambda *a, **k: None  # instance attribute: shadows the method
        try:
            return receive_and_load(self, *args, **kwargs)
        finally:
            del self.model_runner.reload_weights

    extension.update_weights_from_ipc = update_weights_from_ipc


after_import("verl.workers.rollout.vllm_rollout.utils", _never_load)
