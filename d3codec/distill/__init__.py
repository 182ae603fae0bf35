"""Training: the classifier loop, experts, the budget planner, distillation (MTT + MMD), soft
labels, and federated subtasks with merge. `distill.api.encode` is the Python form of `d3codec encode`."""
