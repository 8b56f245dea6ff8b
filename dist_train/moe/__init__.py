"""Physics-informed hard-constraint mixture of experts (PI-HC-MoE): per-expert differentiable
non-linear least-squares solves (see `dist_train.moe.hard_constraint`)."""
