"""The PDE workload: neural PDE solvers trained on the physics (PI-HC-MoE), one concern per module.

- `family`, `grid`: what an equation family provides, the space-time grid and the table of families;
- `fisher_kpp`, `sorption`: each equation's initial conditions, reference solver and boundary rows;
- `data`: the generated data sets (`data.name: reaction_diffusion | diffusion_sorption`);
- `basis`, `basis_fno`: the basis networks f_θ (`model.name: basis_mlp | basis_fno`);
- `physics`: the discretised PDE on a whole grid (training loss, held-out residual);
- `constraint`: the differentiable hard constraint (Levenberg–Marquardt solve, implicit backward);
- `domain`, `experts`: the experts' sub-domains and their exchange across ranks;
- `model`: basis network + constraint, the model a PDE run trains;
- `task`: the `pde` task (`dist_train.tasks.TASKS`): building, layout rules, metrics, plan rows.
"""
