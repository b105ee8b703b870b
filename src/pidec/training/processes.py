"""The processes of a run (one, or several under `accelerate launch` / `torchrun`): which one
this is, its device, and the few collective operations the loop needs.
"""

from __future__ import annotations

import torch


class Processes:
    """This process's place among the run's processes."""

    def __init__(self, device: str):
        from accelerate import PartialState

        want_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self.state = PartialState(cpu=want_cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.rank == 0
        self.device = torch.device(device) if device not in ("auto", "cpu", "cuda") else self.state.device

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of all processes, in one flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over the processes (a CPU tensor)."""
        if self.world == 1:
            return values
        values = values.to(self.device)
        torch.distributed.all_reduce(values)
        return values.cpu()

    def share(self, value):
        """The main process's `value`, on every process (a picklable object of our own making)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
