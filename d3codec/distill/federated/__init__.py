"""Federated distillation: split the classes into subtasks, distil each on its own (own experts,
own decoder, its share of the budget), in parallel on torch.distributed ranks, then merge.

One job per module:
- `split`: the class groups (`contiguous` as in the paper, or `balanced` by image count), the
  round-robin of tasks over ranks, each subtask's seed (from the global seed and its index, never a rank);
- `plan`: `FederatedPlan`, everything fixed before training (each subtask's options, the run key);
- `search`: `plan_federated`, the search of the parts' byte share and K so the merged file fits;
- `markers`: the work folder `<output>.parts/`: part files and the experts' done / failed markers;
- `sharing`: with more ranks than subtasks, which rank trains which expert of a shared subtask;
- `run`: `encode_federated`, running this rank's tasks (serial, `--nproc`, torchrun), then the merge.

Serial, torchrun and separate `--subtask` jobs + `merge` write byte-identical files on CPU.
"""
from d3codec.distill.federated.markers import SharedExpertFailed, clear_expert_markers, finished_part, part_path
from d3codec.distill.federated.plan import DATASET_RESERVE, FEDERATED_VERSION, FederatedPlan
from d3codec.distill.federated.run import encode_federated, run_subtask, run_tasks, run_teacher, torchrun_env
from d3codec.distill.federated.search import plan_federated, smallest_working
from d3codec.distill.federated.sharing import (expert_owner, expert_shares, experts_per_subtask, ranks_with_work,
                                              subtask_group, train_expert_shares)
from d3codec.distill.federated.split import SPLITS, assigned_tasks, split_classes, subtask_seed

__all__ = ["DATASET_RESERVE", "FEDERATED_VERSION", "SPLITS", "FederatedPlan", "SharedExpertFailed", "assigned_tasks",
           "clear_expert_markers", "encode_federated", "expert_owner", "expert_shares", "experts_per_subtask",
           "finished_part", "part_path", "plan_federated", "ranks_with_work", "run_subtask", "run_tasks",
           "run_teacher", "smallest_working", "split_classes", "subtask_group", "subtask_seed", "torchrun_env",
           "train_expert_shares"]
