"""Training (efa-train, efa-eval): data files and datasets, splits, the training loop on one
process or many (torchrun), metrics. The model (efa_deploy.model) and the deployment side
(calculator, model files, LAMMPS) never import this subpackage."""
