"""Resources of the AutoML project, chosen by environment in `resources.environments`."""
